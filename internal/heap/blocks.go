package heap

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/bpfload"
)

// batch is how many live blocks one batched map operation moves.
const batch = 4096

// eachLiveBatch is eachLive with batched lookups (one system call per
// 4096 blocks instead of two per block), falling back to eachLive where
// the kernel has no batch operations.
func eachLiveBatch(m Maps, fn func(mbpf.MemprofLiveKey, mbpf.MemprofLiveBlock)) error {
	if err := bpfload.EachEntry(m.Live, fn); err != nil {
		return fmt.Errorf("read live blocks: %w", err)
	}
	return nil
}

// Block is one sampled live block of a process.
type Block struct {
	Addr, Size uint64 // address returned by the allocator, bytes requested
}

// LiveBlocks lists the sampled live blocks of process pid, at most limit
// of them (0: no limit). Every block is listed at sample rate 1.
func LiveBlocks(m Maps, pid uint32, limit int) ([]Block, error) {
	var out []Block
	err := eachLiveBatch(m, func(k mbpf.MemprofLiveKey, b mbpf.MemprofLiveBlock) {
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
	var keys []mbpf.MemprofLiveKey
	var vals []mbpf.MemprofLiveBlock
	if err := eachLiveBatch(m, func(k mbpf.MemprofLiveKey, b mbpf.MemprofLiveBlock) {
		if k.Tgid == parent {
			k.Tgid = child
			keys = append(keys, k)
			vals = append(vals, b)
		}
	}); err != nil {
		return 0, err
	}
	copied := 0
	for i := 0; i < len(keys); i += batch {
		j := min(i+batch, len(keys))
		n, err := m.Live.BatchUpdate(keys[i:j], vals[i:j], nil)
		if err != nil && errors.Is(err, ebpf.ErrNotSupported) {
			n = 0
			for k := i; k < j; k++ {
				if m.Live.Put(keys[k], vals[k]) == nil {
					n++
				}
			}
		}
		copied += n
	}
	if copied < len(keys) {
		return copied, fmt.Errorf("copy the live blocks of process %d to its child %d: %d of %d did not fit in the live map", parent, child, len(keys)-copied, len(keys))
	}
	return copied, nil
}
