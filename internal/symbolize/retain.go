// Retention of mappings that are gone from the process (dlclose, munmap):
// what symbolization needs from them (the mapping, its build ID and the
// open file) is kept while samples may refer to their addresses, bounded per
// process.

package symbolize

import "sort"

// MaxGoneMappings bounds the mappings a Process keeps after they left the
// process's address space. Past it the ones unmapped longest ago are
// dropped (their files closed) and counted in Dropped: a process that
// loads and unloads libraries without end cannot make memprof hold files
// without end.
const MaxGoneMappings = 256

// markGone records which known mappings are absent from the maps just read
// (present holds the keys of those that are there) and applies the bound.
// Called with p.mu held.
func (p *Process) markGone(present map[[4]uint64]bool) {
	var gone []*pmap
	for k, m := range p.all {
		if !present[k] {
			if !m.gone {
				m.gone = true
				p.goneSeq++
				m.goneAt = p.goneSeq
			}
			gone = append(gone, m)
		} else {
			m.gone = false
		}
	}
	if len(gone) <= MaxGoneMappings {
		return
	}
	sort.Slice(gone, func(i, j int) bool { return gone[i].goneAt < gone[j].goneAt })
	for _, m := range gone[:len(gone)-MaxGoneMappings] {
		p.forget(m)
		p.dropped++
	}
}

// forget removes a mapping: its cached locations, its place among the
// active mappings, and its file once no other known mapping uses it.
// Called with p.mu held.
func (p *Process) forget(m *pmap) {
	delete(p.all, [4]uint64{m.m.Start, m.m.End, m.m.Offset, m.m.Inode})
	for addr, l := range p.locs {
		if l.Mapping == m.pm {
			delete(p.locs, addr)
		}
	}
	for i, a := range p.maps {
		if a == m {
			p.maps = append(p.maps[:i], p.maps[i+1:]...)
			break
		}
	}
	for _, o := range p.all {
		if o.ref == m.ref {
			return
		}
	}
	if p.files[m.ref.id] == m.ref {
		delete(p.files, m.ref.id)
	}
	m.ref.close()
}

// GoneMark returns a mark of the mappings gone so far, for Release: take it
// before reading the samples whose addresses Release is given.
func (p *Process) GoneMark() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.goneSeq
}

// Release drops the mappings that left the process no later than mark
// (GoneMark; ^uint64(0): any) and contain none of addrs (the addresses the
// process's samples refer to, read after mark was taken), closing their
// files. It returns how many it dropped. A mapping still mapped, or gone
// after the mark (its samples may be missing from addrs), is kept.
func (p *Process) Release(addrs []uint64, mark uint64) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return 0
	}
	var gone []*pmap
	for _, m := range p.all {
		if m.gone && m.goneAt <= mark {
			gone = append(gone, m)
		}
	}
	if len(gone) == 0 {
		return 0
	}
	sorted := append([]uint64(nil), addrs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	n := 0
	for _, m := range gone {
		i := sort.Search(len(sorted), func(i int) bool { return sorted[i] >= m.m.Start })
		if i < len(sorted) && sorted[i] < m.m.End {
			continue // a sample still refers to it
		}
		p.forget(m)
		n++
	}
	return n
}

// Retained returns the number of mappings kept after they left the process
// (unmapped) and the number dropped because of MaxGoneMappings.
func (p *Process) Retained() (gone int, dropped uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.all {
		if m.gone {
			gone++
		}
	}
	return gone, p.dropped
}
