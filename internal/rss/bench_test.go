package rss

import (
	"os"
	"testing"

	"unsafe"

	"golang.org/x/sys/unix"
)

// BenchmarkCheckResidency: the snapshot-time cost of the pagemap check,
// per sampled page (64 MiB of this process's resident pages, every 16th
// page sampled: runs of nearby pages share reads).
func BenchmarkCheckResidency(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("pagemap PFNs need root")
	}
	const size = 64 << 20
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(mem)
	for i := 0; i < size; i += pageSize {
		mem[i] = 1
	}
	base := uint64(uintptrOf(mem))
	var folios []folio
	for off := uint64(0); off < size; off += 16 * pageSize {
		folios = append(folios, folio{addr: base + off, size: pageSize})
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		res, err := checkResidency(os.Getpid(), folios)
		if err != nil || res[0].present != 1 {
			b.Fatalf("residency %v %v", err, res[0])
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(folios)), "ns/page")
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
