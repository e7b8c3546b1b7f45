package symbolize

import (
	"io"
	"os"
	"strings"
	"testing"

	"github.com/memprof/memprof/internal/procmaps"
	"github.com/memprof/memprof/internal/testprog"
	"github.com/memprof/memprof/pprofout"
)

// TestAfterDlclose: a library unloaded with dlclose (its mapping gone from
// the process) still symbolizes from the file held open; Release keeps it
// while an address refers to it and drops it (closing the file) once none
// does.
func TestAfterDlclose(t *testing.T) {
	testprog.RequireRoot(t)
	lib := buildLib(t, t.TempDir())
	bin := testprog.Build(t, "sym_dlopen.c", "-ldl")
	pr := start(t, bin, lib)
	p := snapshot(t, NewCache(Options{}), pr.cmd.Process.Pid)
	if _, err := io.WriteString(pr.stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	pr.waitReady(t) // loaded and called
	if err := p.Refresh(); err != nil {
		t.Fatal(err)
	}
	la := pr.addr(t, "lib")
	if _, err := io.WriteString(pr.stdin, "close\n"); err != nil {
		t.Fatal(err)
	}
	pr.waitReady(t) // unloaded
	if mapped(t, pr.cmd.Process.Pid, lib) {
		t.Fatalf("%s still mapped after dlclose: the test proves nothing", lib)
	}
	if err := p.Refresh(); err != nil {
		t.Fatal(err)
	}
	if gone, dropped := p.Retained(); gone != 1 || dropped != 0 {
		t.Errorf("after dlclose: Retained() = %d gone, %d dropped; want 1, 0", gone, dropped)
	}
	p.locs = map[uint64]*pprofout.Location{} // symbolize afresh, from the held file
	l := locate1(t, p, la)
	if len(l.Lines) != 1 || l.Mapping.File != lib {
		t.Fatalf("unloaded library: %+v in %+v", l.Lines, l.Mapping)
	}
	wantLine(t, "unloaded library", l.Lines[0], "sym_lib_variant_a", "sym_lib.c", pr.intField(t, "lib", 2))

	direct := pr.addr(t, "direct")
	if n := p.Release(nil, 0); n != 0 {
		t.Errorf("Release with a mark taken before the dlclose dropped %d mappings, want 0", n)
	}
	mark := p.GoneMark()
	if n := p.Release([]uint64{direct, la}, mark); n != 0 {
		t.Errorf("Release with an address in the unloaded library dropped %d mappings, want 0", n)
	}
	if n := p.Release([]uint64{direct}, mark); n != 1 {
		t.Errorf("Release with no address in the unloaded library dropped %d mappings, want 1", n)
	}
	if gone, _ := p.Retained(); gone != 0 {
		t.Errorf("after Release: %d gone mappings kept, want 0", gone)
	}
	for _, r := range p.files {
		if r.path == lib {
			t.Errorf("the unloaded library's file is still held after Release")
		}
	}
	if l := p.Locate([]uint64{la})[0]; l.Mapping != nil {
		t.Errorf("address in the released library still finds a mapping: %+v", l.Mapping)
	}
	// The executable, still mapped, is untouched.
	if l := locate1(t, p, direct); len(l.Lines) == 0 || l.Lines[0].Function != "sym_capture" && l.Lines[0].Function != "main" {
		t.Errorf("executable after Release: %+v", l.Lines)
	}
}

// mapped tells whether path is in pid's maps.
func mapped(t *testing.T, pid int, path string) bool {
	t.Helper()
	ms, err := procmaps.Read(pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Path == path {
			return true
		}
	}
	return false
}

// TestGoneMappingsBounded: past MaxGoneMappings, the mappings unmapped
// longest ago are dropped, their files closed, and counted.
func TestGoneMappingsBounded(t *testing.T) {
	p := &Process{all: map[[4]uint64]*pmap{}, files: map[procmaps.FileID]*fileRef{}, locs: map[uint64]*pprofout.Location{}}
	n := MaxGoneMappings + 10
	var files []*os.File
	for i := 0; i < n; i++ {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
		m := procmaps.Mapping{Start: uint64(i+1) << 20, End: uint64(i+1)<<20 + 4096, Inode: uint64(i + 1)}
		ref := &fileRef{id: m.ID(), f: f}
		pm := &pmap{m: m, pm: &pprofout.Mapping{Start: m.Start, Limit: m.End}, ref: ref}
		p.all[[4]uint64{m.Start, m.End, m.Offset, m.Inode}] = pm
		p.files[m.ID()] = ref
		p.maps = append(p.maps, pm)
		p.locs[m.Start+1] = &pprofout.Location{Addr: m.Start + 1, Mapping: pm.pm}
		// Each goes in its own Refresh, in order.
		present := map[[4]uint64]bool{}
		for k, o := range p.all {
			if o != pm {
				continue
			}
			present[k] = true
		}
		p.markGone(present)
	}
	p.markGone(map[[4]uint64]bool{}) // the last one goes too
	gone, dropped := p.Retained()
	if gone != MaxGoneMappings || dropped != 10 {
		t.Fatalf("Retained() = %d gone, %d dropped; want %d, 10", gone, dropped, MaxGoneMappings)
	}
	if len(p.files) != MaxGoneMappings || len(p.maps) != MaxGoneMappings || len(p.locs) != MaxGoneMappings {
		t.Errorf("after the bound: %d files, %d maps, %d cached locations; want %d each", len(p.files), len(p.maps), len(p.locs), MaxGoneMappings)
	}
	for i, f := range files {
		_, err := f.Stat()
		closed := err != nil && strings.Contains(err.Error(), "closed")
		if want := i < 10; closed != want {
			t.Errorf("mapping %d (unmapped %d-th): file closed %v, want %v (the oldest go first)", i, i+1, closed, want)
		}
	}
}

// TestConcurrentRefresh: Refresh called from several goroutines at once
// (the recorder's poll loop and its stack-event reader) opens each mapped
// file once.
func TestConcurrentRefresh(t *testing.T) {
	testprog.RequireRoot(t)
	lib := buildLib(t, t.TempDir())
	bin := testprog.Build(t, "sym_dlopen.c", "-ldl")
	pr := start(t, bin, lib)
	p := snapshot(t, NewCache(Options{}), pr.cmd.Process.Pid)
	if _, err := io.WriteString(pr.stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	pr.waitReady(t)
	done := make(chan error)
	for i := 0; i < 8; i++ {
		go func() { done <- p.Refresh() }()
	}
	for i := 0; i < 8; i++ {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	// Each mapped file is held once: count memprof's descriptors of the
	// library.
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && target == lib {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d descriptors of %s held after 8 concurrent Refresh calls, want 1", n, lib)
	}
}
