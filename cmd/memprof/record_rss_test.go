package main

import (
	"math"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// TestRecordRSSCommand runs `memprof record --rss --heap -- cmd`: both
// profiles are written, the RSS profile holds the command's memory as it
// stood in its exit, and the summary compares the two per process.
func TestRecordRSSCommand(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	prog := testprog.Build(t, "rss_known.c")
	dir := t.TempDir()
	out := filepath.Join(dir, "both.pb.gz")
	cmd := exec.Command(memprof, "record", "--rss", "--heap", "--sample-rate", "1", "-o", out, "--", prog)
	cmd.Stdin = strings.NewReader("go\n") // then EOF: the program exits after "ready"
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("memprof record --rss --heap: %v\n%s", err, b)
	}
	s := string(b)
	for _, want := range []string{"command exited with status 0", "RSS profile written to", "heap against RSS, per process", "brk heap 16.", "inside allocator functions "} {
		if !strings.Contains(s, want) {
			t.Errorf("output lacks %q:\n%s", want, s)
		}
	}
	if _, err := pprofout.ReadFile(out); err != nil {
		t.Errorf("heap profile: %v", err)
	}
	p, err := pprofout.ReadFile(filepath.Join(dir, "both.rss.pb.gz"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, smp := range p.Sample {
		for _, loc := range smp.Location {
			for _, ln := range loc.Line {
				if ln.Function != nil && (ln.Function.Name == "own_mmap" || ln.Function.Name == "unmapped") {
					got[ln.Function.Name] += smp.Value[2]
				}
			}
		}
	}
	t.Logf("rss_space at exit: own_mmap %.2f MiB (truth 24), unmapped %.2f MiB (truth 0)", float64(got["own_mmap"])/(1<<20), float64(got["unmapped"])/(1<<20))
	if math.Abs(float64(got["own_mmap"])-24<<20) > 0.03*(24<<20) || got["unmapped"] != 0 {
		t.Errorf("rss_space own_mmap %d unmapped %d, want 24 MiB and 0", got["own_mmap"], got["unmapped"])
	}
}
