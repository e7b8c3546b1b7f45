package procmaps

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// SmapsMaxBytes bounds how much of /proc/PID/smaps is read (the kernel's
// default vm.max_map_count of 65530 mappings is ~60 MiB of smaps): a
// process with more mappings is reported with the first ones only and
// Truncated set.
var SmapsMaxBytes int64 = 64 << 20

// SmapsEntry is one mapping of /proc/PID/smaps with its resident sizes.
type SmapsEntry struct {
	Mapping
	Rss       uint64 // resident bytes
	Anonymous uint64 // resident anonymous bytes (private pages of a file mapping included)
}

// Smaps is the parsed smaps of a process.
type Smaps struct {
	Entries   []SmapsEntry
	Truncated bool // SmapsMaxBytes reached: later mappings are missing
}

// ReadSmaps reads /proc/PID/smaps, at most SmapsMaxBytes of it.
func ReadSmaps(pid int) (*Smaps, error) {
	f, err := os.Open(filepath.Join(ProcRoot, strconv.Itoa(pid), "smaps"))
	if err != nil {
		return nil, fmt.Errorf("read smaps of process %d: %w", pid, err)
	}
	defer f.Close()
	lr := &io.LimitedReader{R: f, N: SmapsMaxBytes}
	sm, err := ParseSmaps(lr)
	if err != nil {
		return nil, fmt.Errorf("read smaps of process %d: %w", pid, err)
	}
	if lr.N <= 0 {
		sm.Truncated = true
		if n := len(sm.Entries); n > 0 {
			sm.Entries = sm.Entries[:n-1] // the last one may be cut
		}
	}
	return sm, nil
}

// ParseSmaps parses smaps text: a maps line per mapping followed by
// "Key: value kB" lines. Lines over 1 MiB are an error.
func ParseSmaps(r io.Reader) (*Smaps, error) {
	sm := &Smaps{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		key, rest, ok := strings.Cut(line, ":")
		if ok && !strings.Contains(key, " ") && !strings.Contains(key, "-") {
			// A field of the current mapping.
			if len(sm.Entries) == 0 {
				continue
			}
			e := &sm.Entries[len(sm.Entries)-1]
			switch key {
			case "Rss", "Anonymous":
				f := strings.Fields(rest)
				if len(f) == 0 {
					continue
				}
				n, err := strconv.ParseUint(f[0], 10, 64)
				if err != nil {
					return nil, fmt.Errorf("smaps line %q: %w", line, err)
				}
				if key == "Rss" {
					e.Rss = n << 10
				} else {
					e.Anonymous = n << 10
				}
			}
			continue
		}
		m, err := parseLine(line)
		if err != nil {
			return nil, err
		}
		sm.Entries = append(sm.Entries, SmapsEntry{Mapping: m})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return sm, nil
}
