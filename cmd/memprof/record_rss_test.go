package main

import (
	"bytes"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/rss"
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
	got := rssOfFunctions(p, "own_mmap", "unmapped")
	t.Logf("rss_space at exit: own_mmap %.2f MiB (truth 24), unmapped %.2f MiB (truth 0)", float64(got["own_mmap"])/(1<<20), float64(got["unmapped"])/(1<<20))
	if math.Abs(float64(got["own_mmap"])-24<<20) > 0.03*(24<<20) || got["unmapped"] != 0 {
		t.Errorf("rss_space own_mmap %d unmapped %d, want 24 MiB and 0", got["own_mmap"], got["unmapped"])
	}
}

// rssOfFunctions sums rss_space (the third sample value) of the samples
// whose stack holds each named function.
func rssOfFunctions(p *profile.Profile, names ...string) map[string]int64 {
	got := map[string]int64{}
	for _, smp := range p.Sample {
		seen := map[string]bool{}
		for _, loc := range smp.Location {
			for _, ln := range loc.Line {
				if ln.Function == nil || seen[ln.Function.Name] || !slices.Contains(names, ln.Function.Name) {
					continue
				}
				seen[ln.Function.Name] = true
				got[ln.Function.Name] += smp.Value[2]
			}
		}
	}
	return got
}

// TestRecordRSSFullDiskFallback: the RSS profile's file system fills up
// during the recording; it is saved in $TMPDIR instead, memprof says where,
// and it holds the recording (the command's own 24 MiB mapping).
func TestRecordRSSFullDiskFallback(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	prog := testprog.Build(t, "rss_known.c")
	full := mountTmpfs(t, "size=64k")
	filler, _ := os.Create(filepath.Join(full, "filler"))
	filler.Write(make([]byte, 1<<20))
	filler.Close()
	tmp := t.TempDir()
	rec := exec.Command(memprof, "record", "--rss", "--sample-rate", "1", "-o", filepath.Join(full, "rss.pb.gz"), "--", prog)
	rec.Env = append(os.Environ(), "TMPDIR="+tmp)
	rec.Stdin = strings.NewReader("go\n")
	out, err := rec.CombinedOutput()
	if err != nil {
		t.Fatalf("memprof record --rss: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`the profile was saved to (\S+) instead`).FindStringSubmatch(string(out))
	if m == nil || filepath.Dir(m[1]) != tmp {
		t.Fatalf("output does not say the RSS profile was saved in %s:\n%s", tmp, out)
	}
	p, err := pprofout.ReadFile(m[1])
	if err != nil {
		t.Fatalf("fallback RSS profile: %v", err)
	}
	got := rssOfFunctions(p, "own_mmap")
	if math.Abs(float64(got["own_mmap"])-24<<20) > 0.03*(24<<20) {
		t.Errorf("fallback RSS profile: own_mmap rss_space %d, want 24 MiB ±3%%", got["own_mmap"])
	}
	if !strings.Contains(string(out), "RSS profile written to "+m[1]) {
		t.Errorf("the summary does not point at the fallback file:\n%s", out)
	}
}

// TestTruncatedLine: the summary's causes of truncated stacks add up to
// their total (a walk cut by the frame limit or an unreadable frame was
// left out: 22 truncated read as 0 + 7). No root needed.
func TestTruncatedLine(t *testing.T) {
	got := truncatedLine(rss.StackStats{Samples: 22650, Truncated: 22, Pending: 0, NoMapping: 7, Unknown: 3})
	for _, want := range []string{"22 of 22650 sampled faults", "0: unwind table not built yet", "7: a return address in no mapping", "15: frame limit or unreadable frame", "3 no stack at all"} {
		if !strings.Contains(got, want) {
			t.Errorf("%q lacks %q", got, want)
		}
	}
}

// TestRecordEscapesTargetNames: a target whose file name, comm and function
// name hold terminal controls and a newline cannot clear the terminal or
// forge a line in `record --rss --heap`'s messages and summaries.
func TestRecordEscapesTargetNames(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	data, err := os.ReadFile(testprog.Build(t, "hostile_comm.c"))
	if err != nil {
		t.Fatal(err)
	}
	data = bytes.ReplaceAll(data, []byte("XX2JX"), []byte("\x1b[2J\n"))
	prog := filepath.Join(t.TempDir(), "\x1b[2J\nmemprof:F")
	if err := os.WriteFile(prog, data, 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "h.pb.gz")
	b, err := exec.Command(memprof, "record", "--rss", "--heap", "--sample-rate", "1", "-o", out, "--", prog).CombinedOutput()
	if err != nil {
		t.Fatalf("memprof record: %v\n%s", err, b)
	}
	s := string(b)
	t.Logf("%s", s)
	if strings.ContainsRune(s, 0x1b) || regexp.MustCompile(`(?m)^\s*memprof(:F| )`).MatchString(s) {
		t.Errorf("a raw control sequence or a forged line reached the output")
	}
	for _, want := range []string{`memprof:F)`, `hostile\x1b[2J\x0amemprof`} {
		if !strings.Contains(s, want) {
			t.Errorf("the escaped name %q is not in the summary", want)
		}
	}
}
