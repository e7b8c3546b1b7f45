package bpfload

import (
	"errors"

	"github.com/cilium/ebpf"
)

// MapBatch is how many entries one batched map lookup of EachEntry moves.
const MapBatch = 4096

// EachEntry calls fn for every entry of hash map m, read with batched
// lookups (one system call per MapBatch entries instead of two per entry;
// Linux 5.6+), falling back to iterating where the kernel has no batch
// operations. Entries added or removed meanwhile may be seen or not. The
// error is the lookup's or the iteration's, unwrapped.
func EachEntry[K, V any](m *ebpf.Map, fn func(K, V)) error {
	keys := make([]K, MapBatch)
	vals := make([]V, MapBatch)
	var cur ebpf.MapBatchCursor
	for first := true; ; first = false {
		n, err := m.BatchLookup(&cur, keys, vals, nil)
		for i := 0; i < n; i++ {
			fn(keys[i], vals[i])
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case err != nil && first && n == 0 && errors.Is(err, ebpf.ErrNotSupported):
			var k K
			var v V
			it := m.Iterate()
			for it.Next(&k, &v) {
				fn(k, v)
			}
			return it.Err()
		case err != nil:
			return err
		}
	}
}
