package recorder

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/testprog"
)

const (
	noFP   = "-fomit-frame-pointer"
	withFP = "-fno-omit-frame-pointer"
)

// buildDeep compiles rec_deep.c and its library with -O2, each with or
// without frame pointers (distro C has none).
func buildDeep(t *testing.T, exeFP, libFP string) string {
	t.Helper()
	dir := t.TempDir()
	flags := []string{"-g", "-O2"}
	lib := exec.Command("gcc", append(flags, libFP, "-shared", "-fPIC", "-o", filepath.Join(dir, "librec_deeplib.so"), testprog.Testdata("rec_deeplib.c"))...)
	if out, err := lib.CombinedOutput(); err != nil {
		t.Fatalf("build library: %v\n%s", err, out)
	}
	bin := filepath.Join(dir, "rec_deep")
	exe := exec.Command("gcc", append(flags, exeFP, "-o", bin, testprog.Testdata("rec_deep.c"), "-L"+dir, "-lrec_deeplib", "-Wl,-rpath,"+dir)...)
	if out, err := exe.CombinedOutput(); err != nil {
		t.Fatalf("build rec_deep: %v\n%s", err, out)
	}
	return bin
}

// frames lists a sample's function names, leaf first, inlined frames
// included.
func frames(s *profile.Sample) []string {
	var out []string
	for _, loc := range s.Location {
		for _, l := range loc.Line {
			out = append(out, l.Function.Name)
		}
	}
	return out
}

var (
	levels   = []string{"level6", "level5", "level4", "level3", "level2", "level1", "main"}
	deepLeak = append([]string{"deep_leak"}, levels...)
	libChain = append([]string{"lib_alloc", "lib_mid", "lib_entry", "recurse", "recurse", "recurse", "recurse", "recurse"}, levels...)
)

func hasPrefix(got, want []string) bool {
	if len(got) < len(want) {
		return false
	}
	for i := range want {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}

// TestStacksWithoutFramePointers: binaries built with -O2
// -fomit-frame-pointer (a deep chain, recursion, a shared library of the
// test's own between the caller and malloc) get complete stacks up to main
// through CFI unwinding, in auto mode (chosen because the executable has no
// frame pointers) and forced dwarf mode; the frame-pointer walk alone does
// not recover them.
func TestStacksWithoutFramePointers(t *testing.T) {
	noFPs := buildDeep(t, noFP, noFP)
	for _, tc := range []struct {
		name, mode, bin string
	}{
		{"cfi-default", "", noFPs},
		{"cfi-exe-fp-lib-none", StackCFI, buildDeep(t, withFP, noFP)},
		{"cfi-exe-none-lib-fp", StackCFI, buildDeep(t, noFP, withFP)},
		{"auto", StackAuto, noFPs},
		{"dwarf", StackDwarf, noFPs},
		{"fp", StackFP, noFPs},
		// Mixed stacks: auto must notice the library (or the executable)
		// without frame pointers.
		{"auto-exe-fp-lib-none", StackAuto, buildDeep(t, withFP, noFP)},
		{"auto-exe-none-lib-fp", StackAuto, buildDeep(t, noFP, withFP)},
	} {
		mode, bin := tc.mode, tc.bin
		t.Run(tc.name, func(t *testing.T) {
			p := record(t, Options{SampleRate: 1, Command: []string{bin}, StackMode: mode}, func(s *Session) {
				if r := s.Wait(context.Background(), 60*time.Second); r != "command exited with status 0" {
					t.Fatalf("session ended with %q", r)
				}
			})
			complete := map[string]int64{}
			for _, smp := range p.Sample {
				f := frames(smp)
				for _, want := range [][]string{deepLeak, libChain} {
					if hasPrefix(f, want) {
						complete[want[0]] += smp.Value[3]
					}
				}
			}
			t.Logf("%s: live bytes under complete chains: %v", mode, complete)
			if mode == StackFP {
				// The frame-pointer walk cannot recover these stacks: this
				// is what makes the CFI path necessary.
				if complete["deep_leak"] == 1_024_000 && complete["lib_alloc"] == 1_024_000 {
					t.Errorf("frame-pointer walk recovered every chain of a -fomit-frame-pointer build: the test proves nothing")
				}
				return
			}
			for _, site := range []string{"deep_leak", "lib_alloc"} {
				if complete[site] != 1_024_000 {
					t.Errorf("%s: %d live bytes under the complete chain up to main, want all 1024000", site, complete[site])
				}
			}
			if t.Failed() {
				for _, smp := range p.Sample {
					t.Logf("sample %v: %s", smp.Value, strings.Join(frames(smp), " <- "))
				}
			}
			if mode != StackFP {
				// Unwind tables are bounded and reported: the executable
				// and its library, libc (and ld.so).
				n, _ := pprofoutComment(p, "unwind_tables")
				b, _ := pprofoutComment(p, "unwind_table_bytes")
				t.Logf("unwind tables: %s, %s bytes", n, b)
				if n == "" || n == "0" || b == "" || b == "0" {
					t.Errorf("unwind table figures missing from the profile: tables %q bytes %q", n, b)
				}
			}
			if v, _ := pprofoutComment(p, "stacks_truncated"); mode != StackFP && v != "0" {
				t.Errorf("%s truncated stacks, want 0", v)
				for _, smp := range p.Sample {
					if f := frames(smp); f[len(f)-1] == "[truncated]" {
						t.Logf("truncated: %v %s", smp.Value, strings.Join(f, " <- "))
					}
				}
			}
		})
	}
}

func pprofoutComment(p *profile.Profile, key string) (string, bool) {
	for _, c := range p.Comments {
		if v, ok := strings.CutPrefix(c, "memprof: "+key+"="); ok {
			return v, true
		}
	}
	return "", false
}

var _ = fmt.Sprint

// TestStacksReclaimed: a long-running session (the agent's DropExited)
// drops the stacks nothing refers to any more once their processes are
// gone: the BPF stack maps and the interned CFI stacks return to empty,
// in auto mode (frame-pointer stack map, stacks copied and unwound in
// userspace) and in the default cfi mode (uw_stacks).
func TestStacksReclaimed(t *testing.T) {
	testprog.RequireRoot(t)
	old := PruneInterval
	PruneInterval = 100 * time.Millisecond
	t.Cleanup(func() { PruneInterval = old })
	fpBin := testprog.Build(t, "rec_leaky.c")
	noFPBin := buildDeep(t, noFP, noFP)
	for _, mode := range []string{StackAuto, StackCFI} {
		t.Run(mode, func(t *testing.T) {
			s, err := Start(context.Background(), Options{SampleRate: 1, AllowEmpty: true, DropExited: true, StackMode: mode})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			mapName := "stacks"
			if mode == StackCFI {
				mapName = "uw_stacks"
			}
			stacks := func() int {
				for _, m := range s.MapStats() {
					if m.Name == mapName {
						return m.Entries
					}
				}
				t.Fatalf("no %s map in MapStats", mapName)
				return 0
			}
			fp := testprog.Start(t, fpBin, nil, "--wait-start", "--wait-end")
			fp.Expect(t, "READY")
			deep := testprog.Start(t, "/bin/sh", nil, "-c", `read x; exec "$0"`, noFPBin)
			for _, pid := range []int{fp.Pid(), deep.Pid()} {
				if err := s.AddPid(pid); err != nil {
					t.Fatal(err)
				}
			}
			deep.Send(t, "go")
			deep.Expect(t, "DONE")
			fp.Send(t, "go")
			fp.Expect(t, "DONE")
			time.Sleep(300 * time.Millisecond) // let the stack copies be unwound
			inUse, interned := stacks(), s.dwarf.size()
			t.Logf("while the targets live: %d stacks in %s, %d interned CFI stacks (copies)", inUse, mapName, interned)
			if inUse == 0 || (mode == StackAuto && interned == 0) {
				t.Fatalf("no stacks recorded (BPF %d, CFI %d): the test proves nothing", inUse, interned)
			}
			fp.Send(t, "go")
			deep.Send(t, "go")
			fp.Cmd.Wait()
			deep.Cmd.Wait()
			deadline := time.Now().Add(10 * time.Second)
			for stacks() != 0 || s.dwarf.size() != 0 {
				if time.Now().After(deadline) {
					t.Fatalf("after the targets exited: %d stacks left in %s, %d interned CFI stacks, want 0 and 0 within 10s", stacks(), mapName, s.dwarf.size())
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

// TestStackDepthLimit: a block allocated 301 calls deep (rec_recurse.c)
// is on a stack cut at the walk's 127 frames; in every BPF stack mode
// (frame pointers, CFI) its 1 MiB is in the profile (rate 1) on a stack
// that ends in [truncated], not one passed off as complete.
func TestStackDepthLimit(t *testing.T) {
	bin := testprog.Build(t, "rec_recurse.c")
	for _, mode := range []string{StackFP, StackCFI} {
		t.Run(mode, func(t *testing.T) {
			p := record(t, Options{SampleRate: 1, Command: []string{bin}, StackMode: mode}, func(s *Session) {
				if r := s.Wait(context.Background(), 30*time.Second); r != "command exited with status 0" {
					t.Fatalf("session ended with %q", r)
				}
			})
			inuse := len(p.SampleType) - 1
			for i, st := range p.SampleType {
				if st.Type == "inuse_space" {
					inuse = i
				}
			}
			var deep, cut int64
			for _, smp := range p.Sample {
				f := frames(smp)
				if len(f) == 0 || f[0] == "[stack unavailable]" || !slices.Contains(f, "recurse") {
					continue
				}
				deep += smp.Value[inuse]
				if f[len(f)-1] == "[truncated]" {
					cut += smp.Value[inuse]
				} else {
					t.Errorf("%d B on a stack of %d frames not marked [truncated]: %s ...", smp.Value[inuse], len(f), strings.Join(f[:min(4, len(f))], " <- "))
				}
			}
			t.Logf("%s: %d B live under recurse, %d B of it on [truncated] stacks (truth 1048576, all)", mode, deep, cut)
			if deep != 1<<20 {
				t.Errorf("%d B live under recurse, want 1048576", deep)
			}
		})
	}
}
