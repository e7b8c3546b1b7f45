package cgroups

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// AnonBytes returns the anonymous resident memory of the memory cgroup dir
// in bytes: total_rss of a v1 memory controller directory (hierarchical),
// anon of a v2 directory, from one read of its memory.stat. It is what
// ReadStats reports as Stats.Anon, without the other files ReadStats reads
// (usage, limit, peak, kmem, failcnt, oom_control, ancestors): the agent's
// per-container metric reads it at every scrape.
func AnonBytes(dir string) (uint64, error) {
	p := filepath.Join(dir, "memory.stat")
	data, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w (the cgroup may have been removed)", p, err)
	}
	// v1 lists rss before total_rss; v2 has anon and no total_rss.
	if v, ok := statField(data, "total_rss"); ok {
		return v, nil
	}
	if v, ok := statField(data, "anon"); ok {
		return v, nil
	}
	return 0, fmt.Errorf("%s has neither total_rss (v1) nor anon (v2)", p)
}

// statField finds "key value" in a memory.stat file's contents.
func statField(data []byte, key string) (uint64, bool) {
	for len(data) > 0 {
		line := data
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			data = nil
		}
		k, v, ok := bytes.Cut(line, []byte{' '})
		if !ok || string(k) != key {
			continue
		}
		n, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 10, 64)
		return n, err == nil
	}
	return 0, false
}
