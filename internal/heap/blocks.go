package heap

import (
	"fmt"

	mbpf "github.com/memprof/memprof/bpf"
)

// Block is one sampled live block of a process.
type Block struct {
	Addr, Size uint64 // address returned by the allocator, bytes requested
}

// LiveBlocks lists the sampled live blocks of process pid, at most limit
// of them (0: no limit). Every block is listed at sample rate 1.
func LiveBlocks(m Maps, pid uint32, limit int) ([]Block, error) {
	var out []Block
	err := eachLive(m, func(k mbpf.MemprofLiveKey, b mbpf.MemprofLiveBlock) {
		if k.Tgid == pid && (limit == 0 || len(out) < limit) {
			out = append(out, Block{Addr: k.Addr, Size: b.Size})
		}
	})
	return out, err
}

// CopyLive gives process child a copy of every sampled live block of
// process parent, as fork(2) gives the child a copy of the parent's heap:
// the child's frees of its copies then find them. It returns how many were
// copied; entries that do not fit in the map are counted in the error.
func CopyLive(m Maps, parent, child uint32) (int, error) {
	type entry struct {
		k mbpf.MemprofLiveKey
		b mbpf.MemprofLiveBlock
	}
	var list []entry
	if err := eachLive(m, func(k mbpf.MemprofLiveKey, b mbpf.MemprofLiveBlock) {
		if k.Tgid == parent {
			list = append(list, entry{k, b})
		}
	}); err != nil {
		return 0, err
	}
	copied, failed := 0, 0
	for _, e := range list {
		e.k.Tgid = child
		if err := m.Live.Put(e.k, e.b); err != nil {
			failed++
			continue
		}
		copied++
	}
	if failed > 0 {
		return copied, fmt.Errorf("copy the live blocks of process %d to its child %d: %d of %d did not fit in the live map", parent, child, failed, len(list))
	}
	return copied, nil
}

// DropLive deletes the sampled live blocks of process pid (not its
// allocation counts): at an exec every block of the old program is gone.
// It returns how many were deleted.
func DropLive(m Maps, pid uint32) (int, error) {
	var keys []mbpf.MemprofLiveKey
	err := eachLive(m, func(k mbpf.MemprofLiveKey, _ mbpf.MemprofLiveBlock) {
		if k.Tgid == pid {
			keys = append(keys, k)
		}
	})
	n := 0
	for _, k := range keys {
		if m.Live.Delete(k) == nil {
			n++
		}
	}
	return n, err
}
