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

// TestReadFileElementBomb: a profile of valid records that cost far more
// parsed than on the wire is refused before it is parsed, with bounded
// memory: 8 million empty samples (2 bytes each, 16 MB, ~65 KB gzipped)
// took ~1.3 GB to parse (the 250 KB file of 128 million took 53 s and 19
// GiB, then failed), and one sample of 20 million packed location ids
// (20 MB) 320 MB.
func TestReadFileElementBomb(t *testing.T) {
	if testing.Short() {
		t.Skip("a resource-bomb test (hundreds of MiB parsed): in the root tier, not in the -short -race unit tier, where the race detector makes it 10-15x slower")
	}
	for _, c := range []struct {
		name string
		data []byte
	}{
		{"samples", bytes.Repeat([]byte{0x12, 0x00}, 8<<20)},
		// field 2 (sample), length 20 MiB + 5; in it field 1 (location_id)
		// packed, length 20 MiB, of varints 1.
		{"locations", append([]byte{0x12, 0x85, 0x80, 0x80, 0x0a, 0x0a, 0x80, 0x80, 0x80, 0x0a}, bytes.Repeat([]byte{1}, 20<<20)...)},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), c.name+".pb.gz")
			var buf bytes.Buffer
			zw := gzip.NewWriter(&buf)
			zw.Write(c.data)
			zw.Close()
			if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
				t.Fatal(err)
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			_, err := ReadFile(path)
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			grew := int64(after.TotalAlloc - before.TotalAlloc)
			t.Logf("%d KiB file, %d MiB decompressed: %v in %v, %d MiB allocated", buf.Len()>>10, len(c.data)>>20, err, took, grew>>20)
			if err == nil || !strings.Contains(err.Error(), "more than") {
				t.Errorf("ReadFile = %v, want an error on its number of records", err)
			}
			// The decompressed bytes are held once (and read twice: counted,
			// then kept); nothing is parsed.
			if limit := 3*int64(len(c.data)) + 16<<20; grew > limit {
				t.Errorf("allocated %d MiB, want at most %d", grew>>20, limit>>20)
			}
		})
	}
}
