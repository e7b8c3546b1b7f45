package rss

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// fakePagemap serves pagemap entries from a map of page number -> entry.
type fakePagemap map[uint64]uint64

func (f fakePagemap) ReadAt(b []byte, off int64) (int, error) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], f[uint64(off)/8+uint64(i/8)])
	}
	return len(b) &^ 7, nil
}

func TestResidencyFrom(t *testing.T) {
	pm := fakePagemap{}
	base := uint64(0x7f0000000000) / pageSize
	pm[base] = pmPresent | 1234           // resident anonymous page
	pm[base+1] = pmPresent | pmFile | 99  // a file page mapped there since
	pm[base+2] = pmSwapped | 5            // swapped out
	pm[base+3] = 0                        // unmapped or MADV_DONTNEED
	for p := uint64(0); p < 512; p += 2 { // a 2 MiB folio half resident
		pm[base+1024+p] = pmPresent | 1
	}
	folios := []folio{
		{addr: (base + 3) * pageSize, size: pageSize},
		{addr: base * pageSize, size: pageSize},
		{addr: (base + 1) * pageSize, size: pageSize},
		{addr: (base + 2) * pageSize, size: pageSize},
		{addr: (base + 1024) * pageSize, size: thpSize},
		{addr: (base + 1<<20) * pageSize, size: pageSize}, // far away: a second read
	}
	got := residencyFrom(pm, folios)
	want := []residency{
		{pages: 1}, {present: 1, pages: 1}, {pages: 1}, {swapped: 1, pages: 1},
		{present: 256, pages: 512}, {pages: 1},
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("folio %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if !got[0].gone() || got[3].gone() || got[1].gone() {
		t.Errorf("gone: unmapped must be gone, swapped and resident not")
	}
	if f := got[4].fraction(); f != 0.5 {
		t.Errorf("half-resident huge page fraction %v, want 0.5", f)
	}
}

func TestResidencyShortRead(t *testing.T) {
	// A pagemap read that returns nothing (range beyond the address space)
	// leaves the folios non-resident rather than failing.
	got := residencyFrom(bytes.NewReader(nil), []folio{{addr: 0x1000, size: pageSize}})
	if got[0].present != 0 || !got[0].gone() {
		t.Errorf("short read: %+v", got[0])
	}
}

func TestReadEntries(t *testing.T) {
	f := fakePagemap{5: 50, 6: 60, 1 << 30: 7, 700: 70}
	got := readEntries(f, []uint64{1 << 30, 6, 5, 700, 9}, 64)
	want := []uint64{7, 60, 50, 70, 0}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d = %d, want %d", i, got[i], want[i])
		}
	}
}
