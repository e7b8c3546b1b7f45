package recorder

import (
	"errors"
	"os/exec"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/procmaps"
)

// TestCheckMappingsBounded: a target whose /proc/PID/maps listing is over
// procmaps.MapsMaxBytes (a hostile number of mappings under long paths:
// 60,000 files under 3,800-byte paths list 236 MB, which the look read
// whole, at every change, into memprof's memory) is not read past the
// bound, and is looked at again only after mapCheckMax even when its
// mappings are said to have changed; once under the bound it is followed
// as before.
func TestCheckMappingsBounded(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	pid := cmd.Process.Pid
	data, err := procmaps.ReadRaw(pid)
	if err != nil || len(data) == 0 {
		t.Fatalf("ReadRaw(%d): %d bytes, %v", pid, len(data), err)
	}

	defer func(n int64) { procmaps.MapsMaxBytes = n }(procmaps.MapsMaxBytes)
	procmaps.MapsMaxBytes = int64(len(data)) / 2
	if _, err := procmaps.ReadRaw(pid); !errors.Is(err, procmaps.ErrMapsTooLarge) {
		t.Fatalf("ReadRaw over the bound: %v, want ErrMapsTooLarge", err)
	}

	s := &Session{}
	tg := &target{pid: pid}
	tg.mapping.remap = true
	before := time.Now()
	s.checkMappings(tg, true)
	if !tg.mapping.tooLarge || tg.mapping.fp != 0 {
		t.Fatalf("after a look over the bound: %+v, want tooLarge and no fingerprint", tg.mapping)
	}
	if tg.mapping.next.Before(before.Add(mapCheckMax)) {
		t.Errorf("next look in %v, want at least mapCheckMax (%v)", tg.mapping.next.Sub(before), mapCheckMax)
	}
	// A change said to have happened (an mmap event) does not bring the
	// next look forward: nothing is read.
	next := tg.mapping.next
	procmaps.MapsMaxBytes = 1 << 30
	tg.mapping.remap = true
	s.checkMappings(tg, true)
	if tg.mapping.next != next || tg.mapping.fp != 0 {
		t.Errorf("a remap of a target over the bound was looked at: %+v", tg.mapping)
	}
	// When due, a listing under the bound is read and fingerprinted again.
	tg.mapping.next = time.Now()
	s.checkMappings(tg, true)
	if tg.mapping.tooLarge || tg.mapping.fp == 0 || tg.mapping.gap != mapCheckMin {
		t.Errorf("after a look under the bound: %+v, want a fingerprint, gap %v", tg.mapping, mapCheckMin)
	}
}
