package targetfs

import (
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
)

// Limits on what memprof reads from one target file. An object or section
// over a limit is not read; the error names the file, the section and the
// limit, and the caller reports the object as skipped.
const (
	// MaxSectionBytes caps the (uncompressed) size of any one ELF section
	// memprof reads: symbol and string tables, notes, CFI, each DWARF
	// section. The largest real sections seen (a browser's .debug_info) are
	// a few hundred MiB.
	MaxSectionBytes = 512 << 20
	// MaxSymtabBytes caps a symbol table (.symtab, .dynsym): 24 bytes per
	// symbol, so 128 MiB is 5.6 million symbols (a browser has ~1 million).
	MaxSymtabBytes = 128 << 20
	// MaxCFIBytes caps .eh_frame and .debug_frame (real ones: < 32 MiB).
	MaxCFIBytes = 64 << 20
	// MaxDWARFBytes caps the sum of an object's DWARF sections.
	MaxDWARFBytes = 1 << 30
	// MaxNoteBytes caps one note section or PT_NOTE segment read for a
	// build ID (real ones: a few hundred bytes).
	MaxNoteBytes = 1 << 20
	// MaxObjectBytes caps the size of a file memprof hashes or CRCs as a
	// whole: a mapped object (content identity, see Digest) or a
	// .gnu_debuglink debug file (its CRC-32 is over the whole file).
	MaxObjectBytes = 4 << 30
)

// ErrTooLarge is wrapped by errors for input over one of the limits.
var ErrTooLarge = errors.New("over memprof's size limit")

// CheckELF validates the section and program headers of ef, parsed from a
// file of fileSize bytes, before anything reads a section: every section
// with contents (and every PT_LOAD / PT_NOTE segment) must lie inside the
// file, and no section may claim more than MaxSectionBytes once
// uncompressed (including the legacy .zdebug_* zlib header). After CheckELF
// succeeds, any Section.Data of ef allocates at most MaxSectionBytes, and
// Section.ReadAt of a compressed section is never called by the readers
// (see Readable).
func CheckELF(ef *elf.File, fileSize int64) error {
	if fileSize < 0 {
		return fmt.Errorf("negative file size")
	}
	fs := uint64(fileSize)
	for _, s := range ef.Sections {
		if s.Type == elf.SHT_NOBITS || s.Type == elf.SHT_NULL {
			continue
		}
		end := s.Offset + s.FileSize
		if end < s.Offset || end > fs {
			return fmt.Errorf("section %s (offset %#x, size %#x) runs past the end of the file (%d bytes)", s.Name, s.Offset, s.FileSize, fileSize)
		}
		if s.FileSize > MaxSectionBytes || s.Size > MaxSectionBytes {
			return fmt.Errorf("section %s of %d bytes: %w (%d bytes per section)", s.Name, max(s.Size, s.FileSize), ErrTooLarge, MaxSectionBytes)
		}
		if strings.HasPrefix(s.Name, ".zdebug") && s.Flags&elf.SHF_COMPRESSED == 0 {
			var hdr [12]byte
			if n, _ := s.ReadAt(hdr[:], 0); n == 12 && string(hdr[:4]) == "ZLIB" {
				if sz := binary.BigEndian.Uint64(hdr[4:]); sz > MaxSectionBytes {
					return fmt.Errorf("section %s decompresses to %d bytes: %w (%d bytes per section)", s.Name, sz, ErrTooLarge, MaxSectionBytes)
				}
			}
		}
	}
	for _, p := range ef.Progs {
		if p.Type != elf.PT_LOAD && p.Type != elf.PT_NOTE && p.Type != elf.PT_INTERP {
			continue
		}
		end := p.Off + p.Filesz
		if end < p.Off || end > fs {
			return fmt.Errorf("%v segment (offset %#x, size %#x) runs past the end of the file (%d bytes)", p.Type, p.Off, p.Filesz, fileSize)
		}
	}
	return nil
}

// Readable reports whether Section.ReadAt may be called on s: it has file
// contents and is not compressed (debug/elf leaves a compressed section
// without a ReaderAt; reading it panics).
func Readable(s *elf.Section) bool {
	return s != nil && s.Type != elf.SHT_NOBITS && s.Flags&elf.SHF_COMPRESSED == 0 && s.ReaderAt != nil
}

// SectionData returns the (uncompressed) contents of s if they are at most
// limit bytes, else an error wrapping ErrTooLarge.
func SectionData(s *elf.Section, limit uint64) ([]byte, error) {
	if s.Size > limit {
		return nil, fmt.Errorf("section %s of %d bytes: %w (%d bytes)", s.Name, s.Size, ErrTooLarge, limit)
	}
	return s.Data()
}

// CheckDWARF checks that the DWARF sections of ef (checked by CheckELF)
// total at most MaxDWARFBytes, so elf.File.DWARF reads a bounded amount.
func CheckDWARF(ef *elf.File) error {
	var total uint64
	for _, s := range ef.Sections {
		if strings.HasPrefix(s.Name, ".debug_") || strings.HasPrefix(s.Name, ".zdebug_") {
			total += s.Size
		}
	}
	if total > MaxDWARFBytes {
		return fmt.Errorf("DWARF sections of %d bytes: %w (%d bytes per object)", total, ErrTooLarge, MaxDWARFBytes)
	}
	return nil
}

// NewELF parses the ELF headers of an open target file and checks them with
// CheckELF.
func NewELF(f *os.File) (*elf.File, error) {
	st, err := StatOf(f)
	if err != nil {
		return nil, err
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return nil, err
	}
	if err := CheckELF(ef, st.Size); err != nil {
		return nil, err
	}
	return ef, nil
}

// digests caches Digest results by file identity, so a file shared by many
// targets is hashed once. It is cleared when it reaches maxDigests entries.
var (
	digestMu sync.Mutex
	digests  = map[Stat]string{}
)

const maxDigests = 8192

// Digest returns the hex SHA-256 of the whole contents of f (a regular file
// of at most MaxObjectBytes): the content identity that, together with a
// build ID, keys memprof's caches, so a file claiming another file's build
// ID cannot stand in for it. Results are cached by (device, inode, size,
// mtime, ctime).
func Digest(f *os.File) (string, error) {
	st, err := StatOf(f)
	if err != nil {
		return "", err
	}
	digestMu.Lock()
	d, ok := digests[st]
	digestMu.Unlock()
	if ok {
		return d, nil
	}
	if st.Size > MaxObjectBytes {
		return "", fmt.Errorf("%s is %d bytes: %w (%d bytes per object)", f.Name(), st.Size, ErrTooLarge, int64(MaxObjectBytes))
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, st.Size)); err != nil {
		return "", fmt.Errorf("hash %s: %w", f.Name(), err)
	}
	d = hex.EncodeToString(h.Sum(nil))
	digestMu.Lock()
	if len(digests) >= maxDigests {
		clear(digests)
	}
	digests[st] = d
	digestMu.Unlock()
	return d, nil
}
