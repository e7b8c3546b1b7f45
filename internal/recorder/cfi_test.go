package recorder

import (
	"context"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/testprog"
)

// buildCFIFields compiles testdata/cfi_fields.c and its dlopen plugin
// cfi_plug.c with -O2 -fomit-frame-pointer into a directory of their own
// (the program takes it as its argument).
func buildCFIFields(t *testing.T) (bin, dir string) {
	t.Helper()
	dir = t.TempDir()
	flags := []string{"-g", "-O2", noFP}
	for _, c := range [][]string{
		append(flags, "-shared", "-fPIC", "-o", filepath.Join(dir, "libcfi_plug.so"), testprog.Testdata("cfi_plug.c")),
		append(flags, "-o", filepath.Join(dir, "cfi_fields"), testprog.Testdata("cfi_fields.c"), "-ldl"),
	} {
		if out, err := exec.Command("gcc", c...).CombinedOutput(); err != nil {
			t.Fatalf("gcc %v: %v\n%s", c, err, out)
		}
	}
	return filepath.Join(dir, "cfi_fields"), dir
}

func runToExit(t *testing.T) func(s *Session) {
	return func(s *Session) {
		if r := s.Wait(context.Background(), 60*time.Second); r != "command exited with status 0" {
			t.Fatalf("session ended with %q", r)
		}
	}
}

func logSamples(t *testing.T, p *profile.Profile) {
	t.Logf("comments: %s", strings.Join(p.Comments, "; "))
	for _, smp := range p.Sample {
		t.Logf("%v %s", smp.Value, strings.Join(frames(smp), " <- "))
	}
}

// TestCFIFieldCases: in the default stack mode (CFI walk in BPF), a
// program without frame pointers whose blocks are allocated by glibc for
// their caller (strdup, asprintf, getline) and by a plugin without frame
// pointers loaded with dlopen after the start (its first samples meet code
// no table describes yet) has every live byte on a complete stack reaching
// main, each block under its calling function, exact at --sample-rate 1.
//
// "immediate": the same allocations in the first millisecond of the
// command, before memprof has listed the libraries ld.so maps after the
// exec: those samples are copied and unwound in userspace, so every byte
// still reaches main; a stack deeper than the copy (8 KiB) would end in
// [truncated]: each such sample must be counted in stacks_truncated. (The
// program keeps its frames small, so here none is.)
func TestCFIFieldCases(t *testing.T) {
	bin, dir := buildCFIFields(t)
	for _, tc := range []struct {
		name   string
		args   []string
		strict bool
	}{
		{"after-startup", []string{"helpers", dir, "300"}, true},
		{"immediate", []string{"helpers", dir}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := record(t, Options{SampleRate: 1, Command: append([]string{bin}, tc.args...)}, runToExit(t))
			under := map[string]int64{}
			var total, toMain, complete, truncatedSamples int64
			for _, smp := range p.Sample {
				f := frames(smp)
				if f[len(f)-1] == "[truncated]" {
					truncatedSamples += smp.Value[0]
				}
				v := smp.Value[3] // inuse_space
				if v == 0 {
					continue
				}
				total += v
				if indexOf(f, "main") >= 0 {
					toMain += v
					if f[len(f)-1] != "[truncated]" {
						complete += v
					}
				}
				for _, chain := range [][]string{
					{"f_strdup", "main"}, {"f_asprintf", "main"}, {"f_getline", "main"}, {"f_direct", "main"},
					{"plug_inner", "plug_outer", "f_plugin", "main"},
				} {
					if i := indexOf(f, chain[0]); i >= 0 && hasInOrder(f[i:], chain...) {
						under[chain[0]] += v
					}
				}
			}
			trunc, _ := pprofoutComment(p, "stacks_truncated")
			t.Logf("live bytes %d, on stacks reaching main %d (complete %d); by caller %v; truncated samples %d, stacks_truncated=%s",
				total, toMain, complete, under, truncatedSamples, trunc)
			if total == 0 || toMain != total {
				t.Errorf("%d of %d live bytes on stacks reaching main, want all", toMain, total)
			}
			for fn, want := range map[string]int64{"f_strdup": 100_000, "f_asprintf": 100_000, "f_direct": 100_000, "plug_inner": 8 << 20} {
				if under[fn] != want {
					t.Errorf("%s: %d live bytes under it <- ... <- main, want exactly %d", fn, under[fn], want)
				}
			}
			if under["f_getline"] < 100_000 {
				t.Errorf("f_getline: %d live bytes under it, want at least the 100000-byte line", under["f_getline"])
			}
			if strconv.FormatInt(truncatedSamples, 10) != trunc {
				t.Errorf("%d samples end in [truncated], stacks_truncated=%s: every truncated stack must be counted", truncatedSamples, trunc)
			}
			if tc.strict && (complete != total || trunc != "0") {
				t.Errorf("%d of %d live bytes on complete stacks, stacks_truncated=%s, want all and 0", complete, total, trunc)
			}
			if t.Failed() {
				logSamples(t, p)
			}
		})
	}
}

// TestCFICxxString: std::string construction and appends, whose blocks
// libstdc++ allocates through operator new (results taken at its ret
// instructions), in a program built without frame pointers: in the
// default mode every live byte of the program's own is on a complete stack
// under its calling function <- main, exact at --sample-rate 1. The one
// block allocated before main (libstdc++'s emergency exception pool, by a
// constructor ld.so runs from _dl_init) is left out of the check; a
// stack that ends in [truncated] must be counted.
func TestCFICxxString(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "cfi_cxxstr")
	if out, err := exec.Command("g++", "-g", "-O2", noFP, "-o", bin, testprog.Testdata("cfi_cxxstr.cc")).CombinedOutput(); err != nil {
		t.Fatalf("g++: %v\n%s", err, out)
	}
	p := record(t, Options{SampleRate: 1, Command: []string{bin}}, runToExit(t))
	under := map[string]int64{}
	var total, complete, truncatedSamples int64
	for _, smp := range p.Sample {
		f := frames(smp)
		if f[len(f)-1] == "[truncated]" {
			truncatedSamples += smp.Value[0]
		}
		v := smp.Value[3]
		if v == 0 || indexOf(f, "_dl_init") >= 0 {
			continue
		}
		total += v
		if indexOf(f, "main") >= 0 && f[len(f)-1] != "[truncated]" {
			complete += v
		}
		for _, fn := range []string{"f_string", "f_append"} {
			if i := indexOf(f, fn); i >= 0 && hasInOrder(f[i:], fn, "main") {
				under[fn] += v
			}
		}
	}
	t.Logf("live bytes %d, on complete stacks reaching main %d; by caller %v", total, complete, under)
	if total == 0 || complete != total {
		t.Errorf("%d of %d live bytes on complete stacks reaching main, want all", complete, total)
	}
	if under["f_string"] != 32+100_001 {
		t.Errorf("f_string: %d live bytes under it, want 100033 (object and buffer)", under["f_string"])
	}
	if under["f_append"] < 32+100_001 {
		t.Errorf("f_append: %d live bytes under it, want at least 100033", under["f_append"])
	}
	if v, _ := pprofoutComment(p, "stacks_truncated"); v != strconv.FormatInt(truncatedSamples, 10) {
		t.Errorf("stacks_truncated=%s, but %d samples end in [truncated]: each must be counted", v, truncatedSamples)
	}
	if t.Failed() {
		logSamples(t, p)
	}
}

// TestCFITightLoop: a binary without frame pointers allocating 100,000
// blocks in a tight loop at --sample-rate 1 loses no stack in the default
// mode (no stack copy once the tables are ready: nothing fills the ring
// buffer) and every block is under loop_leaf <- loop_mid <- main.
func TestCFITightLoop(t *testing.T) {
	bin, _ := buildCFIFields(t)
	const n = 100_000
	p := record(t, Options{SampleRate: 1, Command: []string{bin, "loop", "100000"}}, runToExit(t))
	var objs, bytes int64
	for _, smp := range p.Sample {
		f := frames(smp)
		if i := indexOf(f, "loop_leaf"); i >= 0 && hasInOrder(f[i:], "loop_leaf", "loop_mid", "main") && f[len(f)-1] != "[truncated]" {
			objs += smp.Value[0]
			bytes += smp.Value[3]
		}
	}
	var notes []string
	for _, c := range p.Comments {
		if strings.Contains(c, "lost_") || strings.Contains(c, "stack") || strings.Contains(c, "bpf_") {
			notes = append(notes, c)
		}
	}
	t.Logf("allocations under loop_leaf <- loop_mid <- main: %d (%d live bytes); %s", objs, bytes, strings.Join(notes, "; "))
	if objs != n || bytes != n*64 {
		t.Errorf("%d allocations, %d live bytes on the complete stack, want %d and %d", objs, bytes, n, n*64)
	}
	for _, key := range []string{"lost_ringbuf_full", "lost_stack_collision", "lost_stack_walk_failed", "bpf_stacks_lost"} {
		if v, ok := pprofoutComment(p, key); ok && v != "0" {
			t.Errorf("%s=%s, want 0", key, v)
		}
	}
	if v, _ := pprofoutComment(p, "stacks_truncated"); v != "0" {
		t.Errorf("stacks_truncated=%s, want 0", v)
	}
	if t.Failed() {
		logSamples(t, p)
	}
}
