package pprofout

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf8"

	"github.com/google/pprof/profile"
)

// Write builds p and writes it to w as a gzipped pprof protobuf.
func Write(w io.Writer, p *Profile) error {
	pp, err := Build(p)
	if err != nil {
		return err
	}
	if err := pp.Write(w); err != nil {
		return fmt.Errorf("pprofout: write profile: %w", err)
	}
	return nil
}

// WriteFile builds p and writes it to path atomically: the profile is written
// to a temporary file in the same directory, synced and renamed over path.
// On any error no file is left behind and an existing file at path is
// unchanged.
func WriteFile(path string, p *Profile) error {
	pp, err := Build(p)
	if err != nil {
		return err
	}
	return writeAtomic(path, pp)
}

// writeAtomic encodes pp (gzipped) into a temporary file in path's
// directory, syncs it and renames it over path. On any error no file is left
// behind and an existing file at path is unchanged.
func writeAtomic(path string, pp *profile.Profile) (err error) {
	var buf bytes.Buffer
	if err := pp.Write(&buf); err != nil {
		return fmt.Errorf("pprofout: encode profile for %s: %w", path, err)
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("pprofout: create temporary file for %s: %w", path, err)
	}
	tmpName := tmp.Name()
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmpName)
		}
	}()
	if _, err = tmp.Write(buf.Bytes()); err != nil {
		return fmt.Errorf("pprofout: write temporary file %s: %w", tmpName, err)
	}
	if err = tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("pprofout: chmod temporary file %s: %w", tmpName, err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("pprofout: sync temporary file %s: %w", tmpName, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("pprofout: close temporary file %s: %w", tmpName, err)
	}
	if err = os.Rename(tmpName, path); err != nil {
		return fmt.Errorf("pprofout: rename %s to %s: %w", tmpName, path, err)
	}
	return nil
}

// MaxProfileBytes caps the size of a profile ReadFile accepts, compressed
// and once decompressed: a gzip bomb (14 MB that inflate to tens of GiB) is
// refused with an error instead of exhausting memory. Real heap profiles
// are a few MiB.
const MaxProfileBytes = 256 << 20

// MaxStringBytes caps every string ReadFile keeps from a profile (function,
// file and mapping names, build IDs, labels, comments): longer ones are cut
// and marked, so a hostile profile's 50 MB name is not copied into every
// row, stack and flame-graph node a report renders. Real C++ names stay
// well under 4 KiB.
const MaxStringBytes = 4096

// ReadFile reads a pprof profile (gzipped or not) from path, of at most
// MaxProfileBytes before and after decompression and at most
// MaxProfileMessages and MaxProfileValues records (checkRecords), with
// every string cut to MaxStringBytes (boundString).
func ReadFile(path string) (*profile.Profile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("pprofout: read profile: %w", err)
	}
	defer f.Close()
	data, err := readCapped(f, path)
	if err != nil {
		return nil, err
	}
	if len(data) == 0 {
		return nil, fmt.Errorf("pprofout: %s is not a pprof profile: file is empty", path)
	}
	if len(data) >= 2 && data[0] == 0x1f && data[1] == 0x8b {
		if data, err = gunzipCapped(data, path); err != nil {
			return nil, err
		}
	}
	if err := checkRecords(data); errors.Is(err, errTooManyRecords) {
		return nil, fmt.Errorf("pprofout: %s is %w", path, err)
	} else if err != nil {
		return nil, fmt.Errorf("pprofout: %s is not a pprof profile: %w", path, err)
	}
	p, err := profile.ParseUncompressed(data)
	if err != nil {
		return nil, fmt.Errorf("pprofout: %s is not a pprof profile: %w", path, err)
	}
	if len(p.SampleType) == 0 {
		return nil, fmt.Errorf("pprofout: %s is not a pprof profile: it has no sample types", path)
	}
	boundStrings(p)
	return p, nil
}

// boundStrings cuts every string of p to MaxStringBytes.
func boundStrings(p *profile.Profile) {
	for _, f := range p.Function {
		f.Name, f.SystemName, f.Filename = boundString(f.Name), boundString(f.SystemName), boundString(f.Filename)
	}
	for _, m := range p.Mapping {
		m.File, m.BuildID = boundString(m.File), boundString(m.BuildID)
	}
	for i, c := range p.Comments {
		p.Comments[i] = boundString(c)
	}
	for _, st := range append(append([]*profile.ValueType{}, p.SampleType...), p.PeriodType) {
		if st != nil {
			st.Type, st.Unit = boundString(st.Type), boundString(st.Unit)
		}
	}
	for _, s := range p.Sample {
		if labelsLong(s.Label) {
			l := make(map[string][]string, len(s.Label))
			for k, vs := range s.Label {
				b := make([]string, len(vs))
				for i, v := range vs {
					b[i] = boundString(v)
				}
				l[boundString(k)] = b
			}
			s.Label = l
		}
	}
}

func labelsLong(l map[string][]string) bool {
	for k, vs := range l {
		if len(k) > MaxStringBytes {
			return true
		}
		for _, v := range vs {
			if len(v) > MaxStringBytes {
				return true
			}
		}
	}
	return false
}

// boundString returns s, or a copy of its first MaxStringBytes bytes (cut at
// a UTF-8 boundary) followed by "…[N bytes cut]" — a copy, so the long
// original can be freed.
func boundString(s string) string {
	if len(s) <= MaxStringBytes {
		return s
	}
	n := MaxStringBytes
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return strings.Clone(s[:n]) + fmt.Sprintf("…[%d bytes cut]", len(s)-n)
}

// readCapped reads r to its end, failing once it passes MaxProfileBytes.
func readCapped(r io.Reader, name string) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxProfileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("pprofout: read profile %s: %w", name, err)
	}
	if len(data) > MaxProfileBytes {
		return nil, fmt.Errorf("pprofout: %s is larger than %d MiB: not read (a gzip bomb, or not a heap profile)", name, MaxProfileBytes>>20)
	}
	return data, nil
}

// gunzipCapped decompresses data in two passes: the first counts the
// decompressed bytes in constant memory and refuses more than
// MaxProfileBytes (a gzip bomb costs memprof no memory), the second fills a
// buffer allocated once at the exact size.
func gunzipCapped(data []byte, path string) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("pprofout: %s is not a pprof profile: %w", path, err)
	}
	n, err := io.Copy(io.Discard, io.LimitReader(zr, MaxProfileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("pprofout: %s is not a pprof profile: %w", path, err)
	}
	if n > MaxProfileBytes {
		return nil, fmt.Errorf("pprofout: %s (decompressed) is larger than %d MiB: not read (a gzip bomb, or not a heap profile)", path, MaxProfileBytes>>20)
	}
	if err := zr.Reset(bytes.NewReader(data)); err != nil {
		return nil, fmt.Errorf("pprofout: %s is not a pprof profile: %w", path, err)
	}
	out := make([]byte, n)
	if _, err := io.ReadFull(zr, out); err != nil {
		return nil, fmt.Errorf("pprofout: read profile %s: %w", path, err)
	}
	return out, nil
}

// metaPrefix starts every machine-readable comment.
const metaPrefix = "memprof: "

// MetaComment returns a profile comment carrying a machine-readable figure,
// "memprof: key=value". key must not contain '=' or whitespace.
func MetaComment(key, value string) string {
	return metaPrefix + key + "=" + value
}

// CommentValue returns the value of the first comment of p made by
// MetaComment with key, and whether there was one.
func CommentValue(p *profile.Profile, key string) (string, bool) {
	if p == nil {
		return "", false
	}
	prefix := metaPrefix + key + "="
	for _, c := range p.Comments {
		if v, ok := strings.CutPrefix(c, prefix); ok {
			return v, true
		}
	}
	return "", false
}
