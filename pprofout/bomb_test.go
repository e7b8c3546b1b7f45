package pprofout

import (
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestReadFileGzipBomb: a small gzip file that inflates past
// MaxProfileBytes is refused after reading at most the cap, with bounded
// memory and time.
func TestReadFileGzipBomb(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bomb.pb.gz")
	// One gzip member of 1 MiB of zeros (~1 KiB), repeated: gzip readers
	// decompress concatenated members as one stream.
	var member bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&member, gzip.BestCompression)
	zw.Write(make([]byte, 1<<20))
	zw.Close()
	bomb := bytes.Repeat(member.Bytes(), 2*MaxProfileBytes>>20) // 512 MiB inflated
	if err := os.WriteFile(path, bomb, 0o644); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	_, err := ReadFile(path)
	took := time.Since(start)
	runtime.ReadMemStats(&after)
	grew := int64(after.TotalAlloc - before.TotalAlloc)
	t.Logf("%d KiB bomb: %v in %v, %d MiB allocated", st.Size()>>10, err, took, grew>>20)
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("ReadFile(gzip bomb) = %v, want a size error", err)
	}
	// The file itself is read (1 MiB here); the decompressed stream is only
	// counted. 16 MiB leaves room for the race detector's bookkeeping.
	if grew > 16<<20 {
		t.Errorf("allocated %d MiB reading the bomb, want at most 16", grew>>20)
	}
}
