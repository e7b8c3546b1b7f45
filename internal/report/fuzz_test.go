package report

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/pprofout"
)

// FuzzSeriesReport: a series sidecar is read from a file next to the
// profile; whatever its JSON holds, once series.ReadFile accepts it the
// analysis and every output (text, JSON, HTML) must neither panic nor
// hang. The seed is the sidecar of demo(); `make fuzz` runs it.
func FuzzSeriesReport(f *testing.F) {
	dir := f.TempDir()
	path := demo(f, dir)
	gz, err := os.ReadFile(series.SidecarPath(path))
	if err != nil {
		f.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		f.Fatal(err)
	}
	seed, err := io.ReadAll(zr)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	p, err := pprofout.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, js []byte) {
		sp := filepath.Join(t.TempDir(), "s.series.json.gz")
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write(js)
		zw.Close()
		if err := os.WriteFile(sp, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		s, err := series.ReadFile(sp)
		if err != nil {
			return
		}
		r := Analyze(p.Copy(), s)
		r.Leaks(0)
		WriteGrowth(io.Discard, r, 10, 8)
		WriteJSON(io.Discard, r)
		WriteHTML(io.Discard, r)
	})
}

// FuzzProfileReport: `memprof report` reads profiles a user was handed;
// whatever a profile's protobuf holds, pprofout.ReadFile refuses it or the
// analysis and every output must neither panic nor hang. The seed is the
// uncompressed protobuf of demo()'s profile.
func FuzzProfileReport(f *testing.F) {
	path := demo(f, f.TempDir())
	p, err := pprofout.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	var seed bytes.Buffer
	if err := p.WriteUncompressed(&seed); err != nil {
		f.Fatal(err)
	}
	f.Add(seed.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		pp := filepath.Join(t.TempDir(), "p.pb")
		if err := os.WriteFile(pp, data, 0o644); err != nil {
			t.Fatal(err)
		}
		r, err := Load(pp)
		if err != nil {
			return
		}
		r.Leaks(0)
		WriteGrowth(io.Discard, r, 10, 8)
		WriteJSON(io.Discard, r)
		WriteHTML(io.Discard, r)
	})
}
