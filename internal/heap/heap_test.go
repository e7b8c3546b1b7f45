package heap

import "testing"

// TestStackIDKinds: the 64-bit stack ids of the BPF side are told apart
// by range and flags: uw_stacks keys (CFI walks in BPF) from 2^32 up,
// below it stack copies (STACK_DWARF), return-site stacks (STACK_RET),
// frame-pointer stack ids and STACK_UNKNOWN.
func TestStackIDKinds(t *testing.T) {
	var m Maps
	for _, tc := range []struct {
		id                 uint64
		cfi, copied, atRet bool
	}{
		{id: 7},
		{id: RetStack | 5, atRet: true},
		{id: CopiedStack | 5, copied: true},
		{id: CopiedStack | RetStack | 5, copied: true},
		{id: StackUnknown},
		{id: 1 << 32, cfi: true},
		{id: 0x8000000000000001, cfi: true},
		{id: 0xffffffff00000001 | CopiedStack | RetStack, cfi: true},
	} {
		if got := CFIStack(tc.id); got != tc.cfi {
			t.Errorf("CFIStack(%#x) = %v, want %v", tc.id, got, tc.cfi)
		}
		if got := m.copied(tc.id); got != tc.copied {
			t.Errorf("copied(%#x) = %v, want %v", tc.id, got, tc.copied)
		}
		if got := m.atRet(tc.id); got != tc.atRet {
			t.Errorf("atRet(%#x) = %v, want %v", tc.id, got, tc.atRet)
		}
	}
}

// TestMergeKeepsPending: merging a frozen snapshot keeps its truncated and
// table-pending marks.
func TestMergeKeepsPending(t *testing.T) {
	s := &Snapshot{Stacks: map[uint64][]uint64{}, Memcg: map[uint32]uint64{}}
	other := &Snapshot{Stacks: map[uint64][]uint64{1 << 40: {1, 2}}, Memcg: map[uint32]uint64{},
		Truncated: map[uint64]bool{1 << 40: true}, Pending: map[uint64]bool{1 << 40: true}}
	s.Merge(other)
	if !s.Truncated[1<<40] || !s.Pending[1<<40] || len(s.Stacks[1<<40]) != 2 {
		t.Fatalf("merged snapshot %+v lost the frozen stack's marks", s)
	}
}
