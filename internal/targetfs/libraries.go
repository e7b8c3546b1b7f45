package targetfs

import (
	"bufio"
	"bytes"
	"debug/elf"
	"os/exec"
	"strings"
)

// LoadedLibraries lists the shared objects the dynamic loader will map for
// the executable under env (LD_PRELOAD and LD_LIBRARY_PATH included), by
// asking the executable's own loader (`ld.so --list`, which loads nothing
// and runs none of the program's code). A static executable has none.
func LoadedLibraries(exe string, env []string) []string {
	fd, err := Open(exe) // non-blocking, regular files only
	if err != nil {
		return nil
	}
	defer fd.Close()
	f, err := NewELF(fd) // PT_INTERP checked to lie inside the file
	if err != nil {
		return nil
	}
	interp := ""
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err == nil {
				interp = string(bytes.TrimRight(b, "\x00"))
			}
		}
	}
	if interp == "" {
		return nil
	}
	cmd := exec.Command(interp, "--list", exe)
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		return nil
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		for _, field := range strings.Fields(sc.Text()) {
			if strings.HasPrefix(field, "/") {
				libs = append(libs, field)
			}
		}
	}
	return libs
}
