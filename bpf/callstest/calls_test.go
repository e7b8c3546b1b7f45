package callstest

import (
	"os"
	"runtime"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
)

// Cookie fields and kinds, from the generated enums of bpf/memprof.h.
const (
	wrapper  = uint64(CallsProbeCookieP_WRAPPER)
	retSites = uint64(CallsProbeCookieP_RETSITES)
	forward  = uint64(CallsProbeCookieP_FORWARD)
	offShift = uint64(CallsProbeCookieCOOKIE_OFF_SHIFT)
	sizShift = uint64(CallsProbeCookieCOOKIE_SIZE_SHIFT)
)

const tgid = 4242

// fn is a fake allocator function: its code range and kind.
type fn struct {
	start, size uint64
	kind        CallsProbeKind
	flags       uint64
}

// Fake code addresses: a user function and allocator functions.
var (
	userCode     = uint64(0x400100)
	malloc       = fn{0x10000, 0x100, CallsProbeKindP_MALLOC, 0}
	free         = fn{0x10200, 0x100, CallsProbeKindP_FREE, 0}
	realloc      = fn{0x10400, 0x200, CallsProbeKindP_REALLOC, 0}
	reallocarray = fn{0x10800, 0x40, CallsProbeKindP_REALLOCARRAY, wrapper}
	posixMemalig = fn{0x10900, 0x80, CallsProbeKindP_POSIX_MEMALIGN, 0}
	calloc       = fn{0x10a00, 0x100, CallsProbeKindP_CALLOC, 0}
	newNothrow   = fn{0x20000, 0x40, CallsProbeKindP_MALLOC, retSites}
	newThrowing  = fn{0x20100, 0x40, CallsProbeKindP_MALLOC, retSites}
	// libstdc++'s operator new and its nothrow variant: entry only, the
	// block recorded at the return of the malloc they call.
	newFwd        = fn{0x20200, 0x40, CallsProbeKindP_MALLOC, forward | wrapper}
	newFwdNothrow = fn{0x20300, 0x40, CallsProbeKindP_MALLOC, forward | wrapper}
	alignedAlloc  = fn{0x10b00, 0x100, CallsProbeKindP_MEMALIGN, 0}
)

// enum fwd_state of bpf/memprof.h.
const (
	fwdOuter  = 1
	fwdInner  = 2
	fwdFailed = 3
)

// userBP is the rbp the fake user code has at its calls.
const userBP = 0x7ffc1000

// harness runs the test program on one thread state, with a fake user
// stack in this process's memory (the program reads it with
// bpf_probe_read_user, as it reads a target's stack).
type harness struct {
	t     *testing.T
	objs  CallsObjects
	stack []uint64
	tramp uint64 // the uretprobe trampoline address the probe hits report (0: the test process's)
}

func newHarness(t *testing.T, sampleAll bool) *harness {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("BPF_PROG_RUN needs root")
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	spec, err := LoadCalls()
	if err != nil {
		t.Fatal(err)
	}
	if sampleAll {
		if err := spec.Variables["sample_all"].Set(uint32(1)); err != nil {
			t.Fatal(err)
		}
	}
	h := &harness{t: t, stack: make([]uint64, 512)}
	if err := spec.LoadAndAssign(&h.objs, nil); err != nil {
		t.Fatalf("load test programs: %v", err)
	}
	t.Cleanup(func() { h.objs.Close() })
	if !sampleAll {
		// Gaps of 1 GiB: nothing small is sampled.
		for i := uint32(0); i < uint32(h.objs.Gaps.MaxEntries()); i++ {
			if err := h.objs.Gaps.Put(i, uint64(1<<30)); err != nil {
				t.Fatal(err)
			}
		}
	}
	return h
}

// sp returns the address of stack slot i (higher i: shallower frames), with
// ret stored there as the return address of a call made at that depth.
func (h *harness) sp(i int, ret uint64) uint64 {
	h.stack[i] = ret
	return uint64(uintptr(unsafe.Pointer(&h.stack[i])))
}

func (h *harness) run(op CallsTestOpKind, f fn, sp uint64, a1, a2, a3 uint64) CallsTestResult {
	h.t.Helper()
	var o CallsTestOp
	o.Op = uint32(op)
	o.In.Cookie = uint64(f.kind) | f.flags | 4<<offShift | f.size<<sizShift
	o.In.Ip = f.start + 4
	o.In.Sp = sp
	o.In.A1, o.In.A2, o.In.A3 = a1, a2, a3
	o.In.Tgid = tgid
	o.In.Bp = userBP
	o.In.Tramp = h.tramp
	if err := h.objs.TestOps.Put(uint32(0), o); err != nil {
		h.t.Fatal(err)
	}
	runtime.KeepAlive(h.stack)
	ret, err := h.objs.TestCall.Run(&ebpf.RunOptions{})
	if err != nil || ret != 0 {
		h.t.Fatalf("run test_call: %v (returned %d)", err, ret)
	}
	var res CallsTestResult
	if err := h.objs.TestResults.Lookup(uint32(0), &res); err != nil {
		h.t.Fatal(err)
	}
	return res
}

func (h *harness) enter(f fn, sp, a1, a2, a3 uint64) bool {
	return h.run(CallsTestOpKindT_ENTER, f, sp, a1, a2, a3).Ret != 0
}

// ret runs a return probe: sp is the stack pointer the call had at entry.
func (h *harness) ret(sp, rax uint64) CallsTestResult {
	return h.run(CallsTestOpKindT_RETURN, fn{}, sp, rax, 0, 0)
}

func (h *harness) tail(sp uint64) { h.run(CallsTestOpKindT_TAIL, fn{}, sp, 0, 0, 0) }

func (h *harness) state() CallsThreadState {
	var ts CallsThreadState
	if err := h.objs.TestThreads.Lookup(uint32(0), &ts); err != nil {
		h.t.Fatal(err)
	}
	return ts
}

func (h *harness) counter(c CallsCounter) uint64 {
	var per []uint64
	if err := h.objs.Counters.Lookup(uint32(c), &per); err != nil {
		h.t.Fatal(err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n
}

// live returns the tracked size of block addr (0: not tracked).
func (h *harness) live(addr uint64) uint64 {
	var b CallsLiveBlock
	if err := h.objs.Live.Lookup(CallsLiveKey{Tgid: tgid, Addr: addr}, &b); err != nil {
		return 0
	}
	return b.Size
}

func (h *harness) track(addr, size uint64) {
	if err := h.objs.Live.Put(CallsLiveKey{Tgid: tgid, Addr: addr}, CallsLiveBlock{Size: size}); err != nil {
		h.t.Fatal(err)
	}
}

// TestCallLogic runs the call logic of bpf/calls.h on probe hits given
// explicitly and checks the thread state, the live map and the counters.
func TestCallLogic(t *testing.T) {
	cases := []struct {
		name      string
		sampleAll bool
		run       func(t *testing.T, h *harness)
	}{
		{"reallocarray tail-calls realloc, which frees nested", true, func(t *testing.T, h *harness) {
			const old = 0x5000
			h.track(old, 64)
			s := h.sp(100, userCode)
			if !h.enter(reallocarray, s, old, 10, 100) {
				t.Fatal("reallocarray entry: want its return seen")
			}
			h.tail(s) // jmp realloc
			h.enter(realloc, s, old, 1000, 0)
			// realloc moves the block: it frees the old one from inside.
			h.enter(free, h.sp(90, realloc.start+0x20), old, 0, 0)
			if h.live(old) != 64 {
				t.Error("a free nested in realloc untracked the block before realloc returned")
			}
			r := h.ret(s, 0x6000)
			if r.Ret == 0 || h.live(0x6000) != 1000 || h.live(old) != 0 {
				t.Errorf("after return: recorded %v, live new %d, old %d; want the new 1000-byte block only", r.Ret != 0, h.live(0x6000), h.live(old))
			}
			if n := h.counter(CallsCounterC_NESTED); n != 2 {
				t.Errorf("nested calls %d, want 2 (realloc after the tail jump, free)", n)
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 0 {
				t.Errorf("abandoned calls %d, want 0", n)
			}
		}},
		{"calloc -> malloc@plt while calloc's return probe is armed (musl)", true, func(t *testing.T, h *harness) {
			h.tramp = 0x7fff0000 // [uprobes] page
			s := h.sp(100, userCode)
			if !h.enter(calloc, s, 1000, 1000, 0) {
				t.Fatal("calloc entry: want its return seen")
			}
			h.stack[100] = h.tramp // the kernel arms the return probe after the entry program
			if h.enter(malloc, h.sp(96, calloc.start+0x24), 1000000, 0, 0) {
				t.Error("malloc nested in calloc asked for its return")
			}
			h.ret(h.sp(96, 0), 0xe000) // malloc's return: nested, left to calloc
			if h.live(0xe000) != 0 {
				t.Fatal("the nested malloc recorded the block")
			}
			if r := h.ret(s, 0xe000); r.Ret == 0 || h.live(0xe000) != 1000000 {
				t.Errorf("calloc's return recorded %v, live %d; want 1000000 bytes", r.Ret != 0, h.live(0xe000))
			}
			if n := h.counter(CallsCounterC_NESTED); n != 1 {
				t.Errorf("nested %d, want 1", n)
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 0 {
				t.Errorf("abandoned %d, want 0: the trampoline at the frame's slot is its return address", n)
			}
			// A stale slot after longjmp still abandons the call, trampoline or not.
			h.enter(calloc, s, 10, 10, 0)
			h.stack[100] = userCode + 0x40
			if !h.enter(malloc, h.sp(96, userCode+0x80), 100, 0, 0) {
				t.Error("a call from user code below a stale frame was taken as nested")
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 1 {
				t.Errorf("abandoned %d, want 1", n)
			}
		}},
		{"realloc tail-jumps to a function that is not probed, which frees nested (mimalloc)", true, func(t *testing.T, h *harness) {
			h.tramp = 0x7fff0000
			const old, unprobed = 0x5000, 0x30000 // mi_heap_realloc's code
			h.track(old, 1000)
			s := h.sp(100, userCode)
			if !h.enter(realloc, s, old, 2000, 0) {
				t.Fatal("realloc entry: want its return seen")
			}
			h.stack[100] = h.tramp
			h.tail(s) // jmp mi_heap_realloc@plt
			h.enter(malloc, h.sp(90, unprobed+0x40), 2000, 0, 0)
			h.ret(h.sp(90, 0), 0x6000)
			h.enter(free, h.sp(90, unprobed+0x60), old, 0, 0)
			if h.live(old) != 1000 || h.live(0x6000) != 0 {
				t.Error("calls nested in the tail-called function were taken as calls of their own")
			}
			r := h.ret(s, 0x6000)
			if r.Ret == 0 || h.live(0x6000) != 2000 || h.live(old) != 0 {
				t.Errorf("after return: recorded %v, live new %d, old %d; want the new 2000-byte block only", r.Ret != 0, h.live(0x6000), h.live(old))
			}
			if n := h.counter(CallsCounterC_NESTED); n != 2 {
				t.Errorf("nested %d, want 2 (malloc, free)", n)
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 0 {
				t.Errorf("abandoned %d, want 0", n)
			}
		}},
		{"missed return at the same depth", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(malloc, s, 100, 0, 0)
			// The return never comes (longjmp); the next call of the
			// same site at the same depth is a call of its own.
			if !h.enter(malloc, s, 200, 0, 0) {
				t.Fatal("second malloc taken for a nested call")
			}
			h.ret(s, 0x7000)
			if h.live(0x7000) != 200 {
				t.Errorf("live size %d, want 200 (the second call's)", h.live(0x7000))
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 1 {
				t.Errorf("abandoned calls %d, want 1", n)
			}
		}},
		{"realloc(p, 0) frees p", true, func(t *testing.T, h *harness) {
			h.track(0x5000, 64)
			s := h.sp(100, userCode)
			h.enter(realloc, s, 0x5000, 0, 0)
			h.ret(s, 0)
			if h.live(0x5000) != 0 {
				t.Error("realloc(p, 0) left p tracked")
			}
		}},
		{"failed realloc keeps the block", true, func(t *testing.T, h *harness) {
			h.track(0x5000, 64)
			s := h.sp(100, userCode)
			h.enter(realloc, s, 0x5000, 1<<40, 0)
			h.ret(s, 0)
			if h.live(0x5000) != 64 {
				t.Error("a failed realloc untracked the old block")
			}
		}},
		{"posix_memalign: failure records nothing, success the stored block", true, func(t *testing.T, h *harness) {
			slot := h.sp(200, 0) // the memptr variable, in the fake stack
			s := h.sp(100, userCode)
			h.enter(posixMemalig, s, slot, 64, 4096)
			h.stack[200] = 0x8000 // garbage: posix_memalign failed and stored nothing
			if r := h.ret(s, 12); r.Ret != 0 || h.live(0x8000) != 0 {
				t.Error("a failed posix_memalign (ENOMEM) was recorded")
			}
			h.enter(posixMemalig, s, slot, 64, 4096)
			h.stack[200] = 0x9000
			if r := h.ret(s, 0); r.Ret == 0 || h.live(0x9000) != 4096 {
				t.Errorf("posix_memalign success: live %d, want 4096 at the stored address", h.live(0x9000))
			}
		}},
		{"calloc overflow counts no bytes", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(calloc, s, 1<<33, 1<<33, 0)
			if st := h.state(); st.Active == 0 || st.Pending.Size != 0 {
				t.Errorf("pending size %d (active %d), want 0: n*size overflows", st.Pending.Size, st.Active)
			}
			h.ret(s, 0)
			h.enter(calloc, s, 1000, 3, 0)
			if st := h.state(); st.Pending.Size != 3000 {
				t.Errorf("calloc(1000, 3) pending size %d, want 3000", st.Pending.Size)
			}
		}},
		{"wrapper stays pending and keeps its nested call", false, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			plain := reallocarray
			plain.flags = 0
			if h.enter(plain, s, 0, 10, 10) {
				t.Error("an unsampled call without the wrapper flag asked for its return")
			}
			if !h.enter(reallocarray, s, 0, 10, 10) {
				t.Fatal("an unsampled wrapper call did not ask for its return")
			}
			h.enter(malloc, h.sp(80, reallocarray.start+8), 100, 0, 0)
			if n := h.counter(CallsCounterC_NESTED); n != 1 {
				t.Errorf("nested %d, want 1: the malloc inside the wrapper is left to it", n)
			}
		}},
		{"stale call after longjmp, whatever the depth", true, func(t *testing.T, h *harness) {
			for _, depth := range []int{100, 60, 140} { // same, deeper, shallower
				s := h.sp(100, userCode)
				h.enter(realloc, s, 0, 1000, 0)
				// longjmp: the stack keeps the old return address at s;
				// the next call comes from user code.
				s2 := h.sp(depth, userCode+0x40)
				h.stack[100] = userCode
				if !h.enter(malloc, s2, 1000, 0, 0) {
					t.Fatalf("depth %d: the call after longjmp was taken for a nested call", depth)
				}
				addr := uint64(0xa000 + depth)
				h.ret(s2, addr)
				if h.live(addr) != 1000 {
					t.Errorf("depth %d: not recorded after the abandoned call", depth)
				}
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 3 {
				t.Errorf("abandoned calls %d, want 3", n)
			}
		}},
		{"nothrow new -> new -> malloc: one call, taken at the ret instruction", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			if h.enter(newNothrow, s, 1000, 0, 0) {
				t.Error("a ret-site function asked for a return probe")
			}
			h.enter(newThrowing, h.sp(98, newNothrow.start+0x10), 1000, 0, 0)
			h.enter(malloc, h.sp(94, newThrowing.start+0x18), 1000, 0, 0)
			h.ret(h.sp(94, 0), 0xb000) // malloc's return: nested
			h.ret(h.sp(98, 0), 0xb000) // new's ret instruction: nested
			if h.live(0xb000) != 0 {
				t.Fatal("recorded by a nested return")
			}
			h.stack[100] = userCode
			if r := h.ret(s, 0xb000); r.Ret == 0 || h.live(0xb000) != 1000 {
				t.Errorf("the outer ret did not record the block")
			}
			if n := h.counter(CallsCounterC_NESTED); n != 2 {
				t.Errorf("nested %d, want 2", n)
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 0 {
				t.Errorf("abandoned %d, want 0", n)
			}
		}},
		{"a return above the pending frame abandons it", true, func(t *testing.T, h *harness) {
			s := h.sp(50, userCode)
			h.enter(malloc, s, 100, 0, 0)
			if r := h.ret(h.sp(120, 0), 0xd000); r.Ret != 0 || h.live(0xd000) != 0 {
				t.Error("a return of an outer frame completed the deeper pending call")
			}
			if st := h.state(); st.Active != 0 {
				t.Error("the pending call stayed active after a return above its frame")
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 1 {
				t.Errorf("abandoned %d, want 1", n)
			}
		}},
		{"operator new forwards to malloc: its return records new's block with new's registers", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			if h.enter(newFwd, s, 1000, 0, 0) {
				t.Error("a forwarding operator new asked for a return probe")
			}
			if st := h.state(); st.Active == 0 || st.Pending.Fwd != fwdOuter || st.Pending.Osp != s || st.Pending.Oret != userCode || st.Pending.Obp != userBP {
				t.Fatalf("after new's entry: %+v, want pending, forwarding, its entry registers kept", st)
			}
			ms := h.sp(96, newFwd.start+0x18)
			if !h.enter(malloc, ms, 1000, 0, 0) {
				t.Fatal("the sampled malloc inside new did not ask for its return")
			}
			if st := h.state(); st.Pending.Fwd != fwdInner || st.Pending.Sp != ms {
				t.Fatalf("after malloc's entry: %+v, want malloc's call pending for new", st.Pending)
			}
			r := h.ret(ms, 0xb000)
			if r.Ret == 0 || h.live(0xb000) != 1000 {
				t.Fatalf("malloc's return recorded %v, live %d; want new's 1000 bytes", r.Ret != 0, h.live(0xb000))
			}
			if r.Out.Fwd == 0 || r.Out.Ip != userCode || r.Out.Sp != s+8 || r.Out.Bp != userBP {
				t.Errorf("stack registers %+v, want those of new's return: ip %#x sp %#x bp %#x", r.Out, userCode, s+8, userBP)
			}
			if st := h.state(); st.Active != 0 {
				t.Error("the call stayed pending after its block was recorded")
			}
			// The next new at the same depth is a call of its own, nothing abandoned.
			h.enter(newFwd, s, 64, 0, 0)
			h.enter(malloc, ms, 64, 0, 0)
			h.ret(ms, 0xb100)
			if h.live(0xb100) != 64 {
				t.Error("the second new was not recorded")
			}
			if n := h.counter(CallsCounterC_NESTED); n != 2 {
				t.Errorf("nested %d, want 2", n)
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN) + h.counter(CallsCounterC_FORWARD_UNSEEN); n != 0 {
				t.Errorf("abandoned or unseen %d, want 0", n)
			}
		}},
		{"unsampled forwarded new ends at malloc's entry", false, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(newFwd, s, 100, 0, 0)
			if h.enter(malloc, h.sp(96, newFwd.start+0x18), 100, 0, 0) {
				t.Error("an unsampled forwarded malloc asked for its return")
			}
			if st := h.state(); st.Active != 0 {
				t.Errorf("the unsampled call stayed pending: %+v", st.Pending)
			}
			for i := 0; i < 3; i++ { // more calls of the user code: nothing abandoned
				h.enter(newFwd, s, 100, 0, 0)
				h.enter(malloc, h.sp(96, newFwd.start+0x18), 100, 0, 0)
			}
			h.enter(malloc, s, 100, 0, 0)
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 0 {
				t.Errorf("abandoned %d, want 0", n)
			}
			if n := h.counter(CallsCounterC_CALLS); n != 9 {
				t.Errorf("calls %d, want 9", n)
			}
		}},
		{"forwarded malloc fails: new_handler retry recorded, a throw abandons", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			ms := h.sp(96, newFwd.start+0x18)
			h.enter(newFwd, s, 5000, 0, 0)
			h.enter(malloc, ms, 5000, 0, 0)
			if r := h.ret(ms, 0); r.Ret != 0 {
				t.Fatal("a failed malloc recorded a block")
			}
			if st := h.state(); st.Active == 0 || st.Pending.Fwd != fwdFailed || st.Pending.Sp != s {
				t.Fatalf("after the failure: %+v, want new's call pending again", st.Pending)
			}
			// The new_handler freed memory: new calls malloc again.
			if !h.enter(malloc, ms, 5000, 0, 0) {
				t.Fatal("the retried malloc did not ask for its return")
			}
			if r := h.ret(ms, 0xc000); r.Ret == 0 || h.live(0xc000) != 5000 || r.Out.Ip != userCode {
				t.Errorf("retry: recorded %v, live %d, caller %#x; want 5000 bytes under the caller", r.Ret != 0, h.live(0xc000), r.Out.Ip)
			}
			// Then a new that throws: its exception is allocated by
			// __cxa_allocate_exception's malloc, outside new's code.
			h.enter(newFwd, s, 1<<60, 0, 0)
			h.enter(malloc, ms, 1<<60, 0, 0)
			h.ret(ms, 0)
			exc := h.sp(80, 0x30000)
			if !h.enter(malloc, exc, 144, 0, 0) {
				t.Fatal("the exception's malloc was taken as nested in new")
			}
			h.ret(exc, 0xd000)
			if h.live(0xd000) != 144 {
				t.Error("the exception's malloc was not recorded as a call of its own")
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 0 {
				t.Errorf("abandoned %d, want 0 (the throwing new's malloc was seen failing: nothing lost)", n)
			}
			if n := h.counter(CallsCounterC_FORWARD_UNSEEN); n != 0 {
				t.Errorf("forward_unseen %d, want 0: the failed malloc was seen", n)
			}
		}},
		{"a forwarding new whose allocation is never seen is counted", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(newFwd, s, 100, 0, 0)
			// malloc is not probed; new returns; the user code calls malloc.
			h.stack[100] = userCode + 0x40
			h.enter(malloc, s, 100, 0, 0)
			if n := h.counter(CallsCounterC_FORWARD_UNSEEN); n != 1 {
				t.Errorf("forward_unseen %d, want 1", n)
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 1 {
				t.Errorf("abandoned %d, want 1", n)
			}
		}},
		{"a forwarding new that mallocs a header, then its block: each recorded at its own size", true, func(t *testing.T, h *harness) {
			// A target's own libstdc++ whose operator new(100000) calls
			// malloc(64) for a header it keeps, then malloc(100000).
			s := h.sp(100, userCode)
			h.enter(newFwd, s, 100000, 0, 0)
			ms := h.sp(96, newFwd.start+0x18)
			h.enter(malloc, ms, 64, 0, 0)
			h.ret(ms, 0xf000)
			h.stack[96] = newFwd.start + 0x28
			h.enter(malloc, ms, 100000, 0, 0)
			h.ret(ms, 0xf100)
			if a, b := h.live(0xf000), h.live(0xf100); a != 64 || b != 100000 {
				t.Errorf("header %d bytes, block %d; want 64 and 100000 (the sizes malloc was asked for)", a, b)
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 0 {
				t.Errorf("abandoned %d, want 0", n)
			}
		}},
		{"forwarded new(0) -> malloc(1): the block is malloc's 1 byte", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(newFwd, s, 0, 0, 0)
			ms := h.sp(96, newFwd.start+0x18)
			h.enter(malloc, ms, 1, 0, 0)
			if r := h.ret(ms, 0xf200); r.Ret == 0 || h.live(0xf200) != 1 {
				t.Errorf("recorded %v, live %d; want 1 byte", r.Ret != 0, h.live(0xf200))
			}
		}},
		{"nothrow new -> new -> malloc: one block, at malloc's return, under the outer caller", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(newFwdNothrow, s, 3000, 0, 0)
			if h.enter(newFwd, h.sp(98, newFwdNothrow.start+0x10), 3000, 0, 0) {
				t.Error("the nested forwarding new asked for a return")
			}
			ms := h.sp(94, newFwd.start+0x18)
			h.enter(malloc, ms, 3000, 0, 0)
			if r := h.ret(ms, 0xe000); r.Ret == 0 || h.live(0xe000) != 3000 || r.Out.Ip != userCode || r.Out.Sp != s+8 {
				t.Errorf("recorded %v, live %d, registers %+v; want 3000 bytes with the nothrow new's return", r.Ret != 0, h.live(0xe000), r.Out)
			}
			if n := h.counter(CallsCounterC_NESTED); n != 2 {
				t.Errorf("nested %d, want 2", n)
			}
		}},
		{"forwarding new -> another library's operator new (ret sites) or aligned_alloc", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(newFwdNothrow, s, 700, 0, 0)
			ns := h.sp(98, newFwdNothrow.start+0x10)
			h.enter(newThrowing, ns, 700, 0, 0)
			h.enter(malloc, h.sp(94, newThrowing.start+0x18), 700, 0, 0)
			h.ret(h.sp(94, 0), 0xf000) // nested in the other new: left to it
			if h.live(0xf000) != 0 {
				t.Fatal("recorded by the malloc nested in the other library's new")
			}
			if r := h.ret(ns, 0xf000); r.Ret == 0 || h.live(0xf000) != 700 || r.Out.Fwd == 0 || r.Out.Ip != userCode {
				t.Errorf("the other new's ret: recorded %v, live %d, registers %+v; want 700 bytes under the nothrow new's caller", r.Ret != 0, h.live(0xf000), r.Out)
			}
			h.enter(newFwd, s, 4096, 0, 0)
			as := h.sp(90, newFwd.start+0x18)
			if !h.enter(alignedAlloc, as, 64, 4096, 0) {
				t.Fatal("aligned_alloc in new did not ask for its return")
			}
			if r := h.ret(as, 0x10000); r.Ret == 0 || h.live(0x10000) != 4096 {
				t.Errorf("aligned_alloc's return: live %d, want new's 4096", h.live(0x10000))
			}
		}},
		{"exception out of new: the next call abandons it", true, func(t *testing.T, h *harness) {
			s := h.sp(100, userCode)
			h.enter(newThrowing, s, 1<<60, 0, 0)
			h.enter(malloc, h.sp(96, newThrowing.start+0x18), 1<<60, 0, 0)
			h.ret(h.sp(96, 0), 0) // malloc fails; new throws, caught above
			h.stack[100] = 0      // the catch frame reuses the slot
			s2 := h.sp(96, userCode+0x80)
			h.enter(newThrowing, s2, 1000, 0, 0)
			h.ret(s2, 0xc000)
			if h.live(0xc000) != 1000 {
				t.Error("the call after the exception was not recorded")
			}
			if n := h.counter(CallsCounterC_MISSED_RETURN); n != 1 {
				t.Errorf("abandoned %d, want 1", n)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.run(t, newHarness(t, c.sampleAll))
		})
	}
}
