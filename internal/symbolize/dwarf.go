package symbolize

import (
	"debug/dwarf"
	"fmt"
	"sort"

	"github.com/memprof/memprof/pprofout"
)

// lineRow is one row of a DWARF line table.
type lineRow struct {
	addr uint64
	file uint32 // index into dwTables.strs
	line uint32
	end  bool // end of a sequence: addresses from here on are not covered
}

// funcNode is a subprogram (top level) or an inlined subroutine (child) with
// one of its PC ranges.
type funcNode struct {
	low, high uint64
	name      uint32 // raw name, index into strs
	callFile  uint32 // for inlined subroutines: call site
	callLine  uint32
	children  []*funcNode
}

// dwTables are an object's DWARF line rows and function/inline trees, sorted
// for binary search.
type dwTables struct {
	strs  []string
	rows  []lineRow
	funcs []*funcNode // top level, sorted by low
	bytes int64
}

type tableBuilder struct {
	d          *dwarf.Data
	t          *dwTables
	strIdx     map[string]uint32
	names      map[dwarf.Offset]string
	resolve    *dwarf.Reader
	entries    uint64 // entries read
	maxEntries uint64
	seen       bool         // an entry was read
	last       dwarf.Offset // offset of the last entry read
	nodes      uint64       // function nodes made
	maxNodes   uint64
}

func (b *tableBuilder) str(s string) uint32 {
	if i, ok := b.strIdx[s]; ok {
		return i
	}
	i := uint32(len(b.t.strs))
	b.t.strs = append(b.t.strs, s)
	b.strIdx[s] = i
	b.t.bytes += int64(len(s)) + 16
	return i
}

// buildTables reads every compilation unit's line table and subprogram /
// inlined-subroutine tree. lineBytes is the size of .debug_line: every row
// a line program emits costs at least one byte of it, so more rows than
// bytes means a malformed table that would not end; reading stops there
// with an error.
//
// dwarfBytes is the size of all DWARF sections: function nodes (one per
// PC range of a subprogram or inlined call) are capped at dwarfBytes/4, as
// a range list reused by many entries could otherwise multiply them.
//
// debugLine is the raw .debug_line: each unit's line-program header is
// checked (checkLineHeader) before debug/dwarf reads it.
func buildTables(d *dwarf.Data, debugLine []byte, dwarfBytes uint64) (*dwTables, error) {
	lineBytes := uint64(len(debugLine))
	maxRows := lineBytes + 1
	lineFiles := map[int64][]uint32{}
	lineErrs := 0
	b := &tableBuilder{d: d, t: &dwTables{}, strIdx: map[string]uint32{}, names: map[dwarf.Offset]string{}, resolve: d.Reader(),
		maxNodes: dwarfBytes/4 + 1024, maxEntries: dwarfBytes + 1}
	b.str("")
	r := d.Reader()
	for {
		cu, err := r.Next()
		if err != nil {
			return nil, err
		}
		if cu == nil {
			break
		}
		if err := b.forward(cu); err != nil {
			return nil, err
		}
		if cu.Tag != dwarf.TagCompileUnit && cu.Tag != dwarf.TagPartialUnit {
			r.SkipChildren()
			continue
		}
		var files []uint32
		// A line table shared by several units (dwz partial units) is read
		// once: rows then stay within the bytes of .debug_line.
		stmt, hasStmt := cu.Val(dwarf.AttrStmtList).(int64)
		if f, seen := lineFiles[stmt]; hasStmt && seen {
			files = f
		} else if hasStmt && checkLineHeader(debugLine, stmt) != nil {
			// A header debug/dwarf would choke on: no lines for this unit.
			lineErrs++
		} else if lr, err := d.LineReader(cu); err == nil && lr != nil {
			var le dwarf.LineEntry
			for {
				if err := nextLine(lr, &le); err != nil {
					break // io.EOF, or a corrupt table: keep the rows read so far
				}
				fi := uint32(0)
				if le.File != nil {
					fi = b.str(le.File.Name)
				}
				b.t.rows = append(b.t.rows, lineRow{addr: le.Address, file: fi, line: uint32(le.Line), end: le.EndSequence})
				if uint64(len(b.t.rows)) > maxRows {
					return nil, fmt.Errorf("line tables emit more rows (%d) than .debug_line has bytes (%d): malformed", len(b.t.rows), lineBytes)
				}
			}
			for _, f := range lr.Files() {
				if f == nil {
					files = append(files, 0)
				} else {
					files = append(files, b.str(f.Name))
				}
			}
			if hasStmt {
				lineFiles[stmt] = files
			}
		}
		if !cu.Children {
			continue
		}
		if err := b.walkCU(r, files); err != nil {
			return nil, err
		}
	}
	if lineErrs > 0 && len(b.t.rows) == 0 {
		return nil, fmt.Errorf("%d malformed line-table headers and no usable line table", lineErrs)
	}
	t := b.t
	sort.SliceStable(t.rows, func(i, j int) bool {
		if t.rows[i].addr != t.rows[j].addr {
			return t.rows[i].addr < t.rows[j].addr
		}
		return t.rows[i].end && !t.rows[j].end // sequence ends before starts at the same address
	})
	sort.Slice(t.funcs, func(i, j int) bool { return t.funcs[i].low < t.funcs[j].low })
	t.bytes += int64(len(t.rows))*24 + int64(len(t.funcs))*64
	return t, nil
}

// forward checks that the reader moved forward: a DW_AT_sibling pointing
// back (followed by debug/dwarf's SkipChildren) would otherwise loop over
// the same entries forever (a fuzzer-found hang).
func (b *tableBuilder) forward(e *dwarf.Entry) error {
	// Every entry takes at least a byte: more entries than DWARF bytes is
	// a loop, even through null entries (which debug/dwarf gives no offset).
	if b.entries++; b.entries > b.maxEntries {
		return fmt.Errorf("more DWARF entries than bytes (%d): a sibling reference loops back", b.maxEntries)
	}
	if e.Tag == 0 {
		return nil
	}
	if b.seen && e.Offset <= b.last {
		return fmt.Errorf("DWARF entry at %#x after the one at %#x: a sibling reference loops back", e.Offset, b.last)
	}
	b.seen, b.last = true, e.Offset
	return nil
}

// nextLine is lr.Next, with debug/dwarf's own panics on malformed line
// programs (a DW_LNS_set_file index that is negative as an int indexes its
// file table: found by FuzzDWARFLines) turned into an error that ends this
// line table only.
func nextLine(lr *dwarf.LineReader, le *dwarf.LineEntry) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("debug/dwarf failed on a malformed line program: %v", r)
		}
	}()
	return lr.Next(le)
}

// dwLevel holds, for each open DWARF entry with children, the function nodes
// it created (none for entries that are not functions).
type dwLevel struct{ nodes []*funcNode }

// walkCU reads the entries of one compilation unit (r is positioned after the
// CU entry), building function nodes.
func (b *tableBuilder) walkCU(r *dwarf.Reader, files []uint32) error {
	stack := []dwLevel{{}}
	for len(stack) > 0 {
		e, err := r.Next()
		if err != nil {
			return err
		}
		if e == nil {
			return nil
		}
		if err := b.forward(e); err != nil {
			return err
		}
		if e.Tag == 0 {
			stack = stack[:len(stack)-1]
			continue
		}
		var nodes []*funcNode
		switch e.Tag {
		case dwarf.TagSubprogram, dwarf.TagInlinedSubroutine:
			ranges, _ := b.d.Ranges(e)
			if len(ranges) == 0 {
				break
			}
			name := b.str(b.entryName(e))
			var cf, cl uint32
			if e.Tag == dwarf.TagInlinedSubroutine {
				if v, ok := e.Val(dwarf.AttrCallFile).(int64); ok && v >= 0 && int(v) < len(files) {
					cf = files[v]
				}
				if v, ok := e.Val(dwarf.AttrCallLine).(int64); ok {
					cl = uint32(v)
				}
			}
			parents := nearestFuncs(stack)
			for _, rg := range ranges {
				if rg[1] <= rg[0] {
					continue
				}
				if b.nodes++; b.nodes > b.maxNodes {
					return fmt.Errorf("more than %d function ranges for %d bytes of DWARF: malformed", b.maxNodes, (b.maxNodes-1024)*4)
				}
				n := &funcNode{low: rg[0], high: rg[1], name: name, callFile: cf, callLine: cl}
				nodes = append(nodes, n)
				attached := false
				if e.Tag == dwarf.TagInlinedSubroutine {
					for _, p := range parents {
						if n.low >= p.low && n.low < p.high {
							p.children = append(p.children, n)
							attached = true
							break
						}
					}
				}
				if !attached && e.Tag == dwarf.TagSubprogram {
					b.t.funcs = append(b.t.funcs, n)
				}
				b.t.bytes += 64
			}
		}
		if e.Children {
			stack = append(stack, dwLevel{nodes: nodes})
		}
	}
	return nil
}

// nearestFuncs returns the function nodes of the innermost enclosing entry
// that created any.
func nearestFuncs(stack []dwLevel) []*funcNode {
	for i := len(stack) - 1; i >= 0; i-- {
		if len(stack[i].nodes) > 0 {
			return stack[i].nodes
		}
	}
	return nil
}

// entryName returns the raw (linkage if any) name of a subprogram or inlined
// subroutine, following abstract origins and specifications.
func (b *tableBuilder) entryName(e *dwarf.Entry) string { return b.entryNameDepth(e, 0) }

// maxOriginDepth bounds chains of abstract origins and specifications
// (real ones are 1-3 deep; a malformed chain must not exhaust the stack).
const maxOriginDepth = 16

func (b *tableBuilder) entryNameDepth(e *dwarf.Entry, depth int) string {
	if e == nil || depth > maxOriginDepth {
		return ""
	}
	if s, ok := e.Val(dwarf.AttrLinkageName).(string); ok && s != "" {
		return s
	}
	if s, ok := e.Val(0x2007).(string); ok && s != "" { // DW_AT_MIPS_linkage_name
		return s
	}
	plain, _ := e.Val(dwarf.AttrName).(string)
	// An inlined or out-of-line instance names its function through its
	// abstract origin or specification (resolved once, cached).
	ref, ok := e.Val(dwarf.AttrAbstractOrigin).(dwarf.Offset)
	if !ok {
		if ref, ok = e.Val(dwarf.AttrSpecification).(dwarf.Offset); !ok {
			return plain
		}
	}
	n, cached := b.names[ref]
	if !cached {
		b.names[ref] = "" // breaks cycles in malformed DWARF
		b.resolve.Seek(ref)
		if next, err := b.resolve.Next(); err == nil && next != nil {
			n = b.entryNameDepth(next, depth+1)
		}
		b.names[ref] = n
	}
	if n != "" {
		return n
	}
	return plain
}

// lookupLine returns the file and line of pc from the line table.
func (t *dwTables) lookupLine(pc uint64) (string, int64, bool) {
	i := sort.Search(len(t.rows), func(i int) bool { return t.rows[i].addr > pc }) - 1
	if i < 0 || t.rows[i].end {
		return "", 0, false
	}
	r := t.rows[i]
	return t.strs[r.file], int64(r.line), true
}

// lookupFuncs returns the chain of functions covering pc, outermost first.
func (t *dwTables) lookupFuncs(pc uint64) []*funcNode {
	i := sort.Search(len(t.funcs), func(i int) bool { return t.funcs[i].low > pc }) - 1
	var top *funcNode
	for j := i; j >= 0 && j > i-8; j-- {
		if f := t.funcs[j]; pc >= f.low && pc < f.high {
			top = f
			break
		}
	}
	if top == nil {
		return nil
	}
	chain := []*funcNode{top}
	for cur := top; ; {
		var next *funcNode
		for _, c := range cur.children {
			if pc >= c.low && pc < c.high {
				next = c
				break
			}
		}
		if next == nil {
			break
		}
		chain = append(chain, next)
		cur = next
	}
	return chain
}

// lines symbolizes pc (an ELF virtual address) into pprof lines, innermost
// first. It returns nil when the object knows nothing about pc.
func (o *object) lines(pc uint64, t *dwTables) []pprofout.Line {
	if t != nil {
		file, line, hasLine := t.lookupLine(pc)
		chain := t.lookupFuncs(pc)
		if len(chain) > 0 {
			out := make([]pprofout.Line, 0, len(chain))
			for k := len(chain) - 1; k >= 0; k-- {
				n := chain[k]
				raw := t.strs[n.name]
				if raw == "" && k == 0 {
					if s, ok := o.lookupSymbol(pc); ok {
						raw = s.name
					}
				}
				l := pprofout.Line{Function: o.demangle(raw), SystemName: raw}
				if hasLine {
					l.File, l.Line = file, line
				}
				out = append(out, l)
				file, line, hasLine = t.strs[n.callFile], int64(n.callLine), n.callFile != 0
			}
			return out
		}
		if s, ok := o.lookupSymbol(pc); ok {
			l := pprofout.Line{Function: o.demangle(s.name), SystemName: s.name}
			if hasLine {
				l.File, l.Line = file, line
			}
			return []pprofout.Line{l}
		}
		return nil
	}
	if s, ok := o.lookupSymbol(pc); ok {
		return []pprofout.Line{{Function: o.demangle(s.name), SystemName: s.name}}
	}
	return nil
}
