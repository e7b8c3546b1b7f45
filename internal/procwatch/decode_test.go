package procwatch

import (
	"bytes"
	"encoding/binary"
	"testing"

	mbpf "github.com/memprof/memprof/bpf"
)

func record(t *testing.T, e mbpf.ProceventsPwEvent, path string) []byte {
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, e); err != nil {
		t.Fatal(err)
	}
	if path != "" {
		var ce mbpf.ProceventsPwCgroupEvent
		p := make([]byte, len(ce.Path))
		copy(p, path)
		b.Write(p)
	}
	return b.Bytes()
}

// TestDecode: records as procevents.bpf.c writes them become Events; short
// records and unknown kinds are dropped without a panic.
func TestDecode(t *testing.T) {
	fork := mbpf.ProceventsPwEvent{Memcg: 5, Cgroup: 6, Start: 7, Ts: 8, Kind: uint32(mbpf.ProceventsPwEventKindPE_FORK), Pid: 10, Tgid: 10, Ppid: 3, Ptid: 4}
	e, ok := decode(record(t, fork, ""))
	want := Event{Kind: Fork, Pid: 10, Tgid: 10, ParentPid: 4, ParentTgid: 3, Memcg: 5, Cgroup: 6, Start: 7, Time: 8}
	if !ok || e != want {
		t.Errorf("fork: %+v %v, want %+v", e, ok, want)
	}
	mk := mbpf.ProceventsPwEvent{Cgroup: 9, Kind: uint32(mbpf.ProceventsPwEventKindPE_CGROUP_MKDIR), Level: 3}
	e, ok = decode(record(t, mk, "/kubepods/x"))
	if want := (Event{Kind: CgroupMkdir, Cgroup: 9, Level: 3, Path: "/kubepods/x"}); !ok || e != want {
		t.Errorf("mkdir: %+v %v, want %+v", e, ok, want)
	}
	if _, ok := decode(record(t, fork, "")[:20]); ok {
		t.Errorf("a short record decoded")
	}
	bad := fork
	bad.Kind = 99
	if _, ok := decode(record(t, bad, "")); ok {
		t.Errorf("an unknown kind decoded")
	}
}

// BenchmarkDecode: the reader's cost per fork record, apart from wakeups.
func BenchmarkDecode(b *testing.B) {
	var buf bytes.Buffer
	fork := mbpf.ProceventsPwEvent{Memcg: 5, Cgroup: 6, Start: 7, Ts: 8, Kind: uint32(mbpf.ProceventsPwEventKindPE_FORK), Pid: 10, Tgid: 10, Ppid: 3, Ptid: 4}
	binary.Write(&buf, binary.NativeEndian, fork)
	rec := buf.Bytes()
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := decode(rec); !ok {
			b.Fatal("not decoded")
		}
	}
}
