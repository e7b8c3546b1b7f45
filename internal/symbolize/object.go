package symbolize

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ianlancetaylor/demangle"
	"github.com/memprof/memprof/internal/targetfs"
)

// objKey identifies a parsed object in the cache by content, so that one
// target's file can never stand in for another's: the GNU build ID (if any),
// the SHA-256 of the mapped file (targetfs.Digest) and the identity of the
// separate debug file used, if any (it is found per process root, so two
// targets with one build ID may have different debug files). A hostile file
// claiming a victim's build ID has another digest, hence another entry.
type objKey struct {
	buildID string
	digest  string
	dbg     targetfs.Stat
}

func (k objKey) String() string {
	d := k.digest
	if len(d) > 12 {
		d = d[:12]
	}
	if k.buildID != "" {
		return "build-id " + k.buildID + " sha256 " + d
	}
	return "sha256 " + d
}

// segment is one PT_LOAD program header.
type segment struct {
	vaddr, off, filesz uint64
}

// symbol is one function symbol of an object.
type symbol struct {
	addr, size uint64
	name       string
	global     bool
}

// object is a parsed ELF file: load segments, function symbols and
// (lazily) DWARF line and inline tables.
type object struct {
	key      objKey
	name     string // path of the mapped file, for reports
	buildID  string
	exec     bool // ET_EXEC (non-PIE)
	segs     []segment
	syms     []symbol // sorted by addr
	symBytes int64

	// DWARF is read and turned into tables on first use, from the file the
	// caller holds open (the mapped file, or its separate debug file).
	hasDW     bool
	dwInDebug bool
	dwMu      sync.Mutex
	dwReady   chan struct{} // closed when a build started by a caller ends
	dwDone    bool
	tables    *dwTables
	dwErr     error
	// tablesBytes is the size of tables once built, readable without dwMu
	// (a build can take a while and Stats must not wait for it).
	tablesBytes atomic.Int64

	demangled sync.Map // raw name -> demangled name
}

// hasLines reports whether DWARF line info is available.
func (o *object) hasLines() bool { return o.hasDW }

// approxBytes is an estimate of the memory the object holds.
func (o *object) approxBytes() int64 {
	n := int64(256) + o.symBytes + int64(len(o.segs))*24
	n += o.tablesBytes.Load()
	return n
}

// fileToVaddr converts a file offset into the ELF virtual address space of
// the object through its PT_LOAD program headers.
func (o *object) fileToVaddr(off uint64) (uint64, bool) {
	for _, s := range o.segs {
		if off >= s.off && off < s.off+s.filesz {
			return off - s.off + s.vaddr, true
		}
	}
	return 0, false
}

// readBuildID returns the hex GNU build ID of f, "" if none.
func readBuildID(f *elf.File) string {
	for _, s := range f.Sections {
		if s.Type != elf.SHT_NOTE {
			continue
		}
		if id := buildIDFromNotes(s.Open(), f.ByteOrder); id != "" {
			return id
		}
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		if id := buildIDFromNotes(p.Open(), f.ByteOrder); id != "" {
			return id
		}
	}
	return ""
}

func buildIDFromNotes(r io.Reader, bo binary.ByteOrder) string {
	data, err := io.ReadAll(io.LimitReader(r, 1<<20))
	if err != nil && len(data) == 0 {
		return ""
	}
	for len(data) >= 12 {
		namesz := uint64(bo.Uint32(data[0:4]))
		descsz := uint64(bo.Uint32(data[4:8]))
		typ := bo.Uint32(data[8:12])
		data = data[12:]
		nameEnd := (namesz + 3) &^ 3
		descEnd := (descsz + 3) &^ 3
		if uint64(len(data)) < nameEnd+descsz {
			return ""
		}
		name := data[:namesz]
		desc := data[nameEnd : nameEnd+descsz]
		if typ == ntGNUBuildID && bytes.Equal(bytes.TrimRight(name, "\x00"), []byte("GNU")) {
			return hex.EncodeToString(desc)
		}
		if uint64(len(data)) < nameEnd+descEnd {
			return ""
		}
		data = data[nameEnd+descEnd:]
	}
	return ""
}

// debugLink returns the .gnu_debuglink file name and CRC of f.
func debugLink(f *elf.File) (string, uint32, bool) {
	s := f.Section(".gnu_debuglink")
	if s == nil {
		return "", 0, false
	}
	data, err := targetfs.SectionData(s, maxDebugLinkBytes)
	if err != nil {
		return "", 0, false
	}
	i := bytes.IndexByte(data, 0)
	if i <= 0 {
		return "", 0, false
	}
	name := string(data[:i])
	off := (i + 4) &^ 3
	if off+4 > len(data) {
		return "", 0, false
	}
	return name, f.ByteOrder.Uint32(data[off : off+4]), true
}

// maxDebugLinkBytes bounds .gnu_debuglink (a file name, padding and a CRC).
const maxDebugLinkBytes = 4096

// crcs caches debug-file CRCs by file identity: a debug file shared by many
// targets is read once.
var (
	crcMu sync.Mutex
	crcs  = map[targetfs.Stat]uint32{}
)

// fileCRC is the CRC-32 (the zlib polynomial, as GNU debuglink uses) of the
// whole of an open regular file of at most targetfs.MaxObjectBytes (a 1 TiB
// sparse file is refused, not read).
func fileCRC(f *os.File) (uint32, error) {
	st, err := targetfs.StatOf(f)
	if err != nil {
		return 0, err
	}
	crcMu.Lock()
	v, ok := crcs[st]
	crcMu.Unlock()
	if ok {
		return v, nil
	}
	if st.Size > targetfs.MaxObjectBytes {
		return 0, fmt.Errorf("debug file %s is %d bytes: %w", f.Name(), st.Size, targetfs.ErrTooLarge)
	}
	h := crc32.NewIEEE()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, st.Size)); err != nil {
		return 0, err
	}
	v = h.Sum32()
	crcMu.Lock()
	if len(crcs) > 4096 {
		clear(crcs)
	}
	crcs[st] = v
	crcMu.Unlock()
	return v, nil
}

// hasDebugInfo reports whether f carries DWARF line info.
func hasDebugInfo(f *elf.File) bool {
	s := f.Section(".debug_info")
	if s == nil {
		s = f.Section(".zdebug_info")
	}
	return s != nil && s.Type != elf.SHT_NOBITS && s.Size > 0
}

func hasSymtab(f *elf.File) bool {
	s := f.SectionByType(elf.SHT_SYMTAB)
	return s != nil && s.Size > 0
}

// findDebugFile looks for the separate debug file of an object whose path in
// its process is procPath: by build ID (DebugDir/.build-id/xx/yyyy.debug),
// else by .gnu_debuglink name (next to the object, in its .debug/
// subdirectory, and under each debug directory), first inside the process's
// root procRoot, then in the host's debug directories. Every candidate is
// opened confined to its root (targetfs.OpenInRoot: a target's symlinks and
// ".." cannot lead outside), non-blocking and only if it is a regular file,
// and checked on the very descriptor that is returned: a build-ID match, or
// the debuglink CRC. It returns the file and its identity.
func findDebugFile(f *elf.File, buildID, procPath, procRoot string, debugDirs []string) (*os.File, targetfs.Stat) {
	type cand struct{ root, rel string }
	var cands []cand
	if buildID != "" && len(buildID) > 2 {
		rel := filepath.Join(".build-id", buildID[:2], buildID[2:]+".debug")
		for _, dir := range debugDirs {
			cands = append(cands, cand{procRoot, filepath.Join(dir, rel)})
		}
		for _, dir := range debugDirs {
			cands = append(cands, cand{dir, rel})
		}
		for _, c := range cands {
			if df, st := openDebugCandidate(c.root, c.rel, buildID, 0, false); df != nil {
				return df, st
			}
		}
		cands = cands[:0]
	}
	name, crc, ok := debugLink(f)
	if !ok || strings.Contains(name, "/") {
		return nil, targetfs.Stat{}
	}
	dir := filepath.Dir(procPath)
	cands = append(cands, cand{procRoot, filepath.Join(dir, name)}, cand{procRoot, filepath.Join(dir, ".debug", name)})
	for _, dd := range debugDirs {
		cands = append(cands, cand{procRoot, filepath.Join(dd, dir, name)})
	}
	for _, dd := range debugDirs {
		cands = append(cands, cand{dd, filepath.Join(dir, name)})
	}
	for _, c := range cands {
		if df, st := openDebugCandidate(c.root, c.rel, buildID, crc, true); df != nil {
			return df, st
		}
	}
	return nil, targetfs.Stat{}
}

// openDebugCandidate opens rel inside root if it is an ELF debug file
// matching the object: same build ID (when both have one) and, for a
// debuglink, the right CRC (of at most targetfs.MaxObjectBytes).
func openDebugCandidate(root, rel, buildID string, crc uint32, checkCRC bool) (*os.File, targetfs.Stat) {
	df, err := targetfs.OpenInRoot(root, rel)
	if err != nil {
		return nil, targetfs.Stat{}
	}
	st, err := targetfs.StatOf(df)
	if err != nil {
		df.Close()
		return nil, targetfs.Stat{}
	}
	if checkCRC {
		got, err := fileCRC(df)
		if err != nil || got != crc {
			df.Close()
			return nil, targetfs.Stat{}
		}
	}
	ef, err := targetfs.NewELF(df)
	if err != nil {
		df.Close()
		return nil, targetfs.Stat{}
	}
	if id := readBuildID(ef); buildID != "" && id != "" && id != buildID {
		df.Close()
		return nil, targetfs.Stat{}
	}
	return df, st
}

// newELF parses the ELF headers of r (a target's file of r.Size() bytes) and
// checks them (targetfs.CheckELF) before any section is read.
func newELF(r *io.SectionReader) (*elf.File, error) {
	ef, err := elf.NewFile(r)
	if err != nil {
		return nil, err
	}
	if err := targetfs.CheckELF(ef, r.Size()); err != nil {
		return nil, err
	}
	return ef, nil
}

// symbols returns the symbols of the table of type typ in ef, if the table
// is at most targetfs.MaxSymtabBytes.
func symbols(ef *elf.File, typ elf.SectionType) []elf.Symbol {
	s := ef.SectionByType(typ)
	if s == nil || s.Size > targetfs.MaxSymtabBytes {
		return nil
	}
	var syms []elf.Symbol
	var err error
	if typ == elf.SHT_SYMTAB {
		syms, err = ef.Symbols()
	} else {
		syms, err = ef.DynamicSymbols()
	}
	if err != nil {
		return nil
	}
	return syms
}

// loadObject parses the mapped file f (and its separate debug file dbg, if
// any) into an object. Both are a target's files: headers are checked and
// every read is bounded (package targetfs); callers run it under
// targetfs.Guard.
func loadObject(key objKey, f, dbg *io.SectionReader, name string) (*object, error) {
	ef, err := newELF(f)
	if err != nil {
		return nil, fmt.Errorf("parse ELF %s: %w", name, err)
	}
	o := &object{key: key, buildID: key.buildID, exec: ef.Type == elf.ET_EXEC, name: name}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_LOAD {
			o.segs = append(o.segs, segment{vaddr: p.Vaddr, off: p.Off, filesz: p.Filesz})
		}
	}
	var def *elf.File
	if dbg != nil {
		def, err = newELF(dbg)
		if err != nil {
			def = nil
		}
	}
	// Symbols: .symtab of the file, else of the debug file, plus .dynsym.
	syms := symbols(ef, elf.SHT_SYMTAB)
	if len(syms) == 0 && def != nil {
		syms = symbols(def, elf.SHT_SYMTAB)
	}
	syms = append(syms, symbols(ef, elf.SHT_DYNSYM)...)
	o.setSymbols(syms)
	// DWARF: the file's own, else the debug file's.
	switch {
	case hasDebugInfo(ef):
		o.hasDW = true
	case def != nil && hasDebugInfo(def):
		o.hasDW, o.dwInDebug = true, true
	}
	return o, nil
}

// readDWARF builds the DWARF tables of src, a target's file, within the
// bounds of package targetfs.
func readDWARF(src *io.SectionReader) (*dwTables, error) {
	ef, err := newELF(src)
	if err != nil {
		return nil, err
	}
	if err := targetfs.CheckDWARF(ef); err != nil {
		return nil, err
	}
	d, err := ef.DWARF()
	if err != nil {
		return nil, err
	}
	var debugLine []byte
	var dwarfBytes uint64
	for _, s := range ef.Sections {
		switch {
		case s.Name == ".debug_line" || s.Name == ".zdebug_line":
			if debugLine, err = targetfs.SectionData(s, targetfs.MaxSectionBytes); err != nil {
				return nil, err
			}
			dwarfBytes += s.Size
		case strings.HasPrefix(s.Name, ".debug_") || strings.HasPrefix(s.Name, ".zdebug_"):
			dwarfBytes += s.Size
		}
	}
	// The tables keep what lookups need; the raw DWARF is dropped.
	return buildTables(d, debugLine, dwarfBytes)
}

// dwTables returns the object's DWARF tables, building them on first use
// from f (the mapped file) or dbg (its debug file). It returns nil when the
// object has no DWARF or it cannot be read. The build runs under
// targetfs.Guard: callers wait for it at most targetfs.ObjectDeadline, then
// the object keeps function names only and the error is reported.
func (o *object) dwTables(f, dbg *io.SectionReader) *dwTables {
	if !o.hasDW {
		return nil
	}
	o.dwMu.Lock()
	if o.dwDone {
		defer o.dwMu.Unlock()
		return o.tables
	}
	if ready := o.dwReady; ready != nil { // another caller is building them
		o.dwMu.Unlock()
		select {
		case <-ready:
		case <-time.After(targetfs.ObjectDeadline):
		}
		o.dwMu.Lock()
		defer o.dwMu.Unlock()
		return o.tables
	}
	src := f
	if o.dwInDebug {
		src = dbg
	}
	if src == nil {
		o.dwMu.Unlock()
		return nil // this caller lacks the file; another may have it
	}
	ready := make(chan struct{})
	o.dwReady = ready
	o.dwMu.Unlock()

	var t *dwTables
	err := targetfs.Guard("DWARF of "+o.name, 0, func() error {
		tab, err := readDWARF(src)
		o.dwMu.Lock()
		t = tab
		o.dwMu.Unlock()
		return err
	})
	o.dwMu.Lock()
	defer o.dwMu.Unlock()
	o.dwDone = true
	if err == nil {
		o.tables = t
	}
	o.dwErr = err
	if o.tables != nil {
		o.tablesBytes.Store(o.tables.bytes)
	}
	close(ready)
	return o.tables
}

func (o *object) setSymbols(in []elf.Symbol) {
	seen := make(map[[2]uint64]int, len(in))
	out := make([]symbol, 0, len(in))
	for _, s := range in {
		if elf.ST_TYPE(s.Info) != elf.STT_FUNC && elf.ST_TYPE(s.Info) != elf.STT_GNU_IFUNC {
			continue
		}
		if s.Value == 0 || s.Section == elf.SHN_UNDEF || s.Name == "" {
			continue
		}
		name := s.Name
		if i := strings.Index(name, "@"); i > 0 { // strip symbol versions
			name = name[:i]
		}
		g := elf.ST_BIND(s.Info) == elf.STB_GLOBAL
		k := [2]uint64{s.Value, s.Size}
		if j, ok := seen[k]; ok {
			if g && !out[j].global {
				out[j].name, out[j].global = name, true
			}
			continue
		}
		seen[k] = len(out)
		out = append(out, symbol{addr: s.Value, size: s.Size, name: name, global: g})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].addr != out[j].addr {
			return out[i].addr < out[j].addr
		}
		return out[i].size > out[j].size
	})
	o.syms = out
	o.symBytes = int64(len(out)) * 48
	for _, s := range out {
		o.symBytes += int64(len(s.name))
	}
}

// lookupSymbol returns the function symbol enclosing pc.
func (o *object) lookupSymbol(pc uint64) (symbol, bool) {
	i := sort.Search(len(o.syms), func(i int) bool { return o.syms[i].addr > pc }) - 1
	// Walk back over a few nested or neighbouring symbols to find one whose
	// extent covers pc; a sizeless symbol is accepted only as the closest one.
	for j := i; j >= 0 && j > i-16; j-- {
		s := o.syms[j]
		if pc < s.addr+s.size {
			return s, true
		}
		if s.size == 0 && j == i {
			return s, true
		}
	}
	return symbol{}, false
}

// maxMangledLen bounds the raw names handed to the demangler: a symbol name
// is target-controlled input, and real mangled names stay far below this.
const maxMangledLen = 16 << 10

// demangleOpts render names pprof style (parameters, enclosing parameters
// and clone suffixes dropped; Rust's legacy "::h<hash>" suffix is dropped by
// the library) with the output capped at 2^16 bytes.
var demangleOpts = []demangle.Option{demangle.NoParams, demangle.NoEnclosingParams, demangle.NoClones, demangle.MaxLength(16)}

// demangle returns the readable name of a raw symbol name: Itanium C++
// ("_Z…"), legacy Rust ("_ZN…17h<16 hex>E") and Rust v0 ("_R…") names are
// demangled with github.com/ianlancetaylor/demangle; anything else, or a
// name the library rejects, is returned unchanged.
func (o *object) demangle(raw string) string {
	if !strings.HasPrefix(raw, "_Z") && !strings.HasPrefix(raw, "_R") {
		return raw
	}
	if v, ok := o.demangled.Load(raw); ok {
		return v.(string)
	}
	d := demangleName(raw)
	o.demangled.Store(raw, d)
	return d
}

// demangleName is demangle without the per-object memo.
func demangleName(raw string) (out string) {
	if !strings.HasPrefix(raw, "_Z") && !strings.HasPrefix(raw, "_R") || len(raw) > maxMangledLen {
		return raw
	}
	defer func() {
		// The library turns its own parse errors into errors; anything
		// else it panics with must not take memprof down either.
		if recover() != nil {
			out = raw
		}
	}()
	return demangle.Filter(raw, demangleOpts...)
}

// ntGNUBuildID is the note type of a GNU build ID (NT_GNU_BUILD_ID).
const ntGNUBuildID = 3
