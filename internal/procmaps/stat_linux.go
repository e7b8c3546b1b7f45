package procmaps

import (
	"os"
	"syscall"
)

// InodeOf returns the inode number of an open file.
func InodeOf(f *os.File) (uint64, bool) {
	fi, err := f.Stat()
	if err != nil {
		return 0, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Ino, true
}

// StatID returns the (device, inode) of a path, in the same packing as Mapping.ID.
func StatID(path string) (FileID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return FileID{}, err
	}
	major := uint64((st.Dev>>8)&0xfff) | uint64((st.Dev>>32)&^0xfff)
	minor := uint64(st.Dev&0xff) | uint64((st.Dev>>12)&^0xff)
	return FileID{Dev: major<<20 | minor, Inode: st.Ino}, nil
}
