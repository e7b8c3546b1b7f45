// The netlink process events connector (cn_proc, NETLINK_CONNECTOR): the
// fallback source where the BPF programs cannot be loaded. It needs
// CAP_NET_ADMIN in the initial network namespace, reports threads as well
// as processes (the reader filters nothing) and no cgroup events; a full
// socket buffer loses events (ENOBUFS: ErrOverrun, not how many).

package procwatch

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Constants of linux/connector.h and linux/cn_proc.h.
const (
	cnIdxProc         = 1
	cnValProc         = 1
	procCnMcastListen = 1
	evFork            = 0x00000001
	evExec            = 0x00000002
	evExit            = 0x80000000
	nlHdrLen          = 16
	cnMsgLen          = 20 // struct cn_msg: id (8), seq, ack, len (2), flags (2)
)

// connector reads the netlink process events connector.
type connector struct {
	f       *os.File // the netlink socket, non-blocking, in Go's poller
	buf     []byte
	overrun uint64 // ENOBUFS seen
	// pendingOverrun: the buffer overflowed after the events read returned
	// last (ErrOverrun at the next read)
	pendingOverrun bool
}

// openConnector subscribes to the kernel's process events connector.
func openConnector() (*connector, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_CONNECTOR)
	if err != nil {
		return nil, fmt.Errorf("process events: netlink connector socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: cnIdxProc}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("process events: bind to the cn_proc group (needs CAP_NET_ADMIN and the host's network namespace): %w", err)
	}
	// A larger buffer rides out bursts of forks (2 MiB: ~25,000 events).
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 2<<20)
	msg := make([]byte, nlHdrLen+cnMsgLen+4)
	le := binary.LittleEndian
	le.PutUint32(msg[0:], uint32(len(msg)))
	le.PutUint16(msg[4:], unix.NLMSG_DONE)
	le.PutUint32(msg[8:], 0) // seq
	le.PutUint32(msg[12:], uint32(os.Getpid()))
	le.PutUint32(msg[nlHdrLen:], cnIdxProc)
	le.PutUint32(msg[nlHdrLen+4:], cnValProc)
	le.PutUint16(msg[nlHdrLen+16:], 4)
	le.PutUint32(msg[nlHdrLen+cnMsgLen:], procCnMcastListen)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("process events: subscribe: %w", err)
	}
	return &connector{f: os.NewFile(uintptr(fd), "cn_proc"), buf: make([]byte, 64<<10)}, nil
}

// read blocks until events arrive (or close) and returns them; only fork,
// exec and exit events are returned. After close it returns os.ErrClosed.
func (w *connector) read() ([]Event, error) {
	if w.pendingOverrun {
		w.pendingOverrun = false
		return nil, ErrOverrun
	}
	rc, err := w.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	// Every message queued by now, up to maxBatch events: one wake-up for
	// a burst, not one per event.
	var out []Event
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for len(out) < maxBatch {
			n, _, e := unix.Recvfrom(int(fd), w.buf, 0)
			switch {
			case e == unix.EINTR:
				continue
			case e == unix.EAGAIN:
				return len(out) > 0 // nothing queued: wait (or return what came)
			case e != nil:
				rerr = e
				return true
			}
			out = append(out, parse(w.buf[:n])...)
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	if rerr == unix.ENOBUFS {
		w.overrun++
		if len(out) > 0 {
			w.pendingOverrun = true // said at the next read
			return out, nil
		}
		return nil, ErrOverrun
	}
	if rerr != nil && len(out) == 0 {
		return nil, fmt.Errorf("process events: %w", rerr)
	}
	return out, nil
}

// parse decodes the netlink messages in b (each one cn_msg with one
// proc_event); malformed ones are skipped.
func parse(b []byte) []Event {
	le := binary.LittleEndian
	var out []Event
	for len(b) >= nlHdrLen {
		l := int(le.Uint32(b))
		if l < nlHdrLen || l > len(b) {
			break
		}
		m := b[nlHdrLen:l]
		b = b[(l+3)&^3:]
		if len(m) < cnMsgLen || le.Uint32(m) != cnIdxProc || le.Uint32(m[4:]) != cnValProc {
			continue
		}
		ev := m[cnMsgLen:]
		// struct proc_event: what (4), cpu (4), timestamp_ns (8), data.
		if len(ev) < 16+16 {
			continue
		}
		d := ev[16:]
		u := func(i int) int { return int(le.Uint32(d[4*i:])) }
		switch le.Uint32(ev) {
		case evFork:
			out = append(out, Event{Kind: Fork, ParentPid: u(0), ParentTgid: u(1), Pid: u(2), Tgid: u(3)})
		case evExec:
			out = append(out, Event{Kind: Exec, Pid: u(0), Tgid: u(1)})
		case evExit:
			out = append(out, Event{Kind: Exit, Pid: u(0), Tgid: u(1)})
		}
	}
	return out
}

func (w *connector) close() error { return w.f.Close() }

// lost counts the overruns (the events each lost are not known).
func (w *connector) lost() uint64 { return w.overrun }
