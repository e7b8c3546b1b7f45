package procwatch

import (
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"
)

// msg builds one netlink message carrying a proc_event.
func msg(what uint32, data ...uint32) []byte {
	le := binary.LittleEndian
	b := make([]byte, nlHdrLen+cnMsgLen+16+4*len(data))
	le.PutUint32(b, uint32(len(b)))
	le.PutUint32(b[nlHdrLen:], cnIdxProc)
	le.PutUint32(b[nlHdrLen+4:], cnValProc)
	ev := b[nlHdrLen+cnMsgLen:]
	le.PutUint32(ev, what)
	for i, d := range data {
		le.PutUint32(ev[16+4*i:], d)
	}
	return b
}

func TestParse(t *testing.T) {
	b := append(msg(evFork, 10, 10, 11, 11), msg(evExec, 11, 11, 0, 0)...)
	b = append(b, msg(0x40, 1, 2, 3, 4)...) // an event kind not reported
	b = append(b, msg(evExit, 12, 11, 0, 0)...)
	b = append(b, 0xff, 0xff) // trailing garbage
	got := parse(b)
	want := []Event{
		{Kind: Fork, ParentPid: 10, ParentTgid: 10, Pid: 11, Tgid: 11},
		{Kind: Exec, Pid: 11, Tgid: 11},
		{Kind: Exit, Pid: 12, Tgid: 11},
	}
	if len(got) != len(want) {
		t.Fatalf("parsed %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("event %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	// Lengths that lie end the parse without a panic.
	bad := msg(evFork, 1, 1, 2, 2)
	binary.LittleEndian.PutUint32(bad, 1<<30)
	if ev := parse(bad); len(ev) != 0 {
		t.Errorf("parsed %v from a message longer than the buffer", ev)
	}
}

// TestWatchChild: the fork, exec and exit of a child are reported by the
// connector (the fallback source).
func TestWatchChild(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatalf("this test needs root (the process events connector); run the suite as root")
	}
	w, err := OpenConnector()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	cmd := exec.Command("/bin/true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	cmd.Wait()
	seen := map[Kind]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !seen[Exit] {
			evs, err := w.Read()
			if err != nil && !errors.Is(err, ErrOverrun) {
				return
			}
			for _, e := range evs {
				if e.Tgid == pid && e.Pid == pid {
					seen[e.Kind] = true
				}
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		w.Close()
		<-done
	}
	for _, k := range []Kind{Fork, Exec, Exit} {
		if !seen[k] {
			t.Errorf("event kind %d of child %d not seen (seen %v)", k, pid, seen)
		}
	}
}
