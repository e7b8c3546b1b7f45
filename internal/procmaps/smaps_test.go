package procmaps

import (
	"strings"
	"testing"
)

const smapsText = `55d7f1871000-55d7f355c000 rw-p 00000000 00:00 0                          [heap]
Size:              30636 kB
Rss:               20788 kB
Anonymous:         20788 kB
VmFlags: rd wr mr mw me ac sd
7fb7fcf7e000-7fb7fd133000 rw-p 00000000 00:00 0 
Size:               1748 kB
Rss:                1680 kB
Anonymous:          1680 kB
7fb7fd200000-7fb7fd201000 r-xp 00001000 fe:00 1234                       /opt/my app/lib 0.so
Rss:                   4 kB
Anonymous:             0 kB
`

// TestParseSmaps: paths after an inode of 0 ([heap]) and paths with spaces
// are read whole; Rss and Anonymous are in bytes.
func TestParseSmaps(t *testing.T) {
	sm, err := ParseSmaps(strings.NewReader(smapsText))
	if err != nil {
		t.Fatal(err)
	}
	if len(sm.Entries) != 3 {
		t.Fatalf("%d entries, want 3", len(sm.Entries))
	}
	want := []struct {
		path      string
		rss, anon uint64
	}{{"[heap]", 20788 << 10, 20788 << 10}, {"", 1680 << 10, 1680 << 10}, {"/opt/my app/lib 0.so", 4096, 0}}
	for i, w := range want {
		e := sm.Entries[i]
		if e.Path != w.path || e.Rss != w.rss || e.Anonymous != w.anon {
			t.Errorf("entry %d: path %q rss %d anon %d, want %q %d %d", i, e.Path, e.Rss, e.Anonymous, w.path, w.rss, w.anon)
		}
	}
	if sm.Entries[0].Start != 0x55d7f1871000 || sm.Entries[0].End != 0x55d7f355c000 {
		t.Errorf("heap range %x-%x", sm.Entries[0].Start, sm.Entries[0].End)
	}
}
