package frag

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/memprof/memprof/internal/procmaps"
)

// GlibcHeapMax is glibc's HEAP_MAX_SIZE on 64-bit hosts: every non-main
// arena is a reservation of this size, aligned to it.
const GlibcHeapMax = 64 << 20

// ProcessMem is the memory state of one process, in bytes, from /proc.
type ProcessMem struct {
	// VMRSS is /proc/PID/status's VmRSS (the sum of the Rss* fields); the
	// Rss* fields keep their /proc names, which are already Go-cased.
	VMRSS, RssAnon, RssFile, RssShmem uint64
	Threads                           int
	OOMScoreAdj                       int
	// GlibcArenas counts glibc's non-main arena heaps: anonymous mappings
	// that start on a 64 MiB boundary and, with the anonymous mappings
	// right after them, form exactly a 64 MiB reservation (HEAP_MAX_SIZE).
	// Only meaningful for glibc processes (Go's heap arenas look alike).
	GlibcArenas int
}

// ReadProcess reads /proc/PID/status, oom_score_adj and maps.
func ReadProcess(pid int) (ProcessMem, error) {
	var pm ProcessMem
	dir := filepath.Join(procmaps.ProcRoot, strconv.Itoa(pid))
	data, err := os.ReadFile(filepath.Join(dir, "status"))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return pm, fmt.Errorf("read %s/status: process %d is gone", dir, pid)
		}
		return pm, fmt.Errorf("read %s/status: %w (run memprof as root to read other processes)", dir, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseUint(f[0], 10, 64)
		switch k {
		case "VmRSS":
			pm.VMRSS = n << 10
		case "RssAnon":
			pm.RssAnon = n << 10
		case "RssFile":
			pm.RssFile = n << 10
		case "RssShmem":
			pm.RssShmem = n << 10
		case "Threads":
			pm.Threads = int(n)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "oom_score_adj")); err == nil {
		pm.OOMScoreAdj, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	maps, err := procmaps.Read(pid)
	if err != nil {
		return pm, err
	}
	pm.GlibcArenas = CountGlibcArenas(maps)
	return pm, nil
}

// CountGlibcArenas counts the non-main glibc arena heaps in a memory map (see
// ProcessMem.GlibcArenas). Two fully grown heaps that the kernel merged into
// one mapping count once at most: the figure is a lower bound.
func CountGlibcArenas(maps []procmaps.Mapping) int {
	n := 0
	for i := 0; i < len(maps); i++ {
		m := &maps[i]
		if !anonymous(m) || m.Start%GlibcHeapMax != 0 || !strings.HasPrefix(m.Perms, "rw") {
			continue
		}
		want := m.Start + GlibcHeapMax
		end := m.End
		j := i + 1
		for end < want && j < len(maps) && maps[j].Start == end && anonymous(&maps[j]) {
			end = maps[j].End
			j++
		}
		if end == want {
			n++
			i = j - 1
		}
	}
	return n
}

// anonymous reports whether m is an anonymous mapping, unnamed or named by
// prctl(PR_SET_VMA_ANON_NAME) ("[anon:glibc: malloc arena]" with glibc's
// glibc.mem.decorate_maps tunable).
func anonymous(m *procmaps.Mapping) bool {
	return m.Inode == 0 && (m.Path == "" || strings.HasPrefix(m.Path, "[anon:"))
}
