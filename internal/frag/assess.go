package frag

import (
	"fmt"
	"strings"

	"github.com/memprof/memprof/internal/cgroups"
	"github.com/memprof/memprof/pprofout"
)

// Alarm thresholds, as Redis's MEMORY DOCTOR uses them: fragmentation is
// worth acting on only when RSS exceeds live bytes by more than AlarmRatio
// times AND by more than AlarmExcess bytes (a small heap with a high ratio
// wastes nothing that matters).
const (
	AlarmRatio  = 1.4
	AlarmExcess = 10 << 20
)

// Verdict is the fragmentation judgement for one process or cgroup.
type Verdict struct {
	Allocator Allocator
	RSS       uint64  // anonymous resident bytes judged (RssAnon, or memcg anon)
	Live      uint64  // live allocated bytes (allocator's or memprof's estimate)
	Ratio     float64 // RSS / Live; 0 when not covered or Live is 0
	Excess    int64   // RSS - Live (negative when RSS < Live)
	Covered   bool    // the ratio means something for this allocator
	Alarm     bool    // Ratio > AlarmRatio and Excess > AlarmExcess
	Summary   string
	Advice    []string
	// Withheld says why no verdict is given although the figures are
	// there (live bytes known to be incomplete); Alarm and Advice are then
	// empty.
	Withheld string
}

// Covers reports whether the RSS/live ratio is meaningful for a: only for
// malloc implementations. Runtimes with their own heaps (Go, JVM, V8,
// pymalloc) hold memory malloc never sees.
func Covers(a Allocator) bool { return a == Glibc || a == Jemalloc || a == Tcmalloc || a == Mimalloc }

// Assess judges a process whose allocator is a, with rss anonymous resident
// bytes (ProcessMem.RssAnon) and live bytes allocated through malloc. pm, if
// not nil, refines the advice (threads, glibc arenas).
func Assess(a Allocator, rss, live uint64, pm *ProcessMem) Verdict {
	v := Verdict{Allocator: a, RSS: rss, Live: live, Excess: int64(rss) - int64(live)}
	if !Covers(a) {
		v.Excess = 0
		v.Summary = notCovered(a)
		return v
	}
	if live == 0 {
		v.Summary = fmt.Sprintf("no live %s allocations measured: the fragmentation ratio cannot be computed (profile the process longer, or check that memprof's malloc probes are attached)", a)
		return v
	}
	v.Covered = true
	v.Ratio = float64(rss) / float64(live)
	v.Alarm = v.Ratio > AlarmRatio && v.Excess > AlarmExcess
	switch {
	case v.Alarm:
		v.Summary = fmt.Sprintf("high fragmentation: %s of anonymous RSS holds %s of live %s allocations (ratio %.2f, %s not in use)",
			human(rss), human(live), a, v.Ratio, human(uint64(v.Excess)))
		v.Advice = advice(a, pm)
	case v.Ratio < 0.95:
		v.Summary = fmt.Sprintf("ratio %.2f (RSS %s below live %s): part of the heap is swapped out or never touched, or the live estimate is high (sampling error)", v.Ratio, human(rss), human(live))
	case v.Ratio > AlarmRatio:
		v.Summary = fmt.Sprintf("ratio %.2f but only %s not in use (alarm needs more than %s): fine", v.Ratio, human(uint64(v.Excess)), human(AlarmExcess))
	default:
		v.Summary = fmt.Sprintf("healthy: ratio %.2f (RSS %s, live %s)", v.Ratio, human(rss), human(live))
	}
	return v
}

// AssessCgroup judges a whole cgroup: its memory.stat anon against live,
// the summed live malloc bytes of its processes. allocs are the allocators
// of those processes; the ratio is covered only when all are malloc
// implementations (one Go or JVM process makes the anon figure unusable).
func AssessCgroup(st *cgroups.Stats, live uint64, allocs []Allocator) Verdict {
	a := Unknown
	mixed := false
	for i, x := range allocs {
		if i == 0 {
			a = x
		} else if x != a {
			mixed = true
		}
	}
	for _, x := range allocs {
		if !Covers(x) {
			v := Verdict{Allocator: x, RSS: st.Anon, Live: live}
			v.Summary = fmt.Sprintf("cgroup %s: %s", st.Path, notCovered(x))
			return v
		}
	}
	if len(allocs) == 0 {
		return Verdict{Allocator: Unknown, RSS: st.Anon, Live: live,
			Summary: fmt.Sprintf("cgroup %s: allocators of its processes unknown; no ratio", st.Path)}
	}
	var v Verdict
	if mixed {
		v = Assess(Glibc, st.Anon, live, nil)
		v.Allocator = Unknown
		var adv []string
		seen := map[Allocator]bool{}
		for _, x := range allocs {
			if !seen[x] && v.Alarm {
				seen[x] = true
				adv = append(adv, advice(x, nil)...)
			}
		}
		v.Advice = adv
		v.Summary = strings.Replace(v.Summary, "live glibc", "live malloc", 1)
	} else {
		v = Assess(a, st.Anon, live, nil)
	}
	v.Summary = fmt.Sprintf("cgroup %s: %s", st.Path, v.Summary)
	return v
}

func notCovered(a Allocator) string {
	switch a {
	case Go:
		return "Go program: the Go runtime keeps its own heap (spans, GC goal GOGC, scavenger), so RSS/malloc-live is meaningless; read runtime/metrics /memory/classes/heap/released and /memory/classes/heap/free instead, or set GOMEMLIMIT"
	case JVM:
		return "JVM: the Java heap (-Xmx), metaspace and code cache are not malloc allocations, so RSS/malloc-live is meaningless; use Native Memory Tracking (-XX:NativeMemoryTracking=summary, jcmd VM.native_memory)"
	case V8:
		return "Node.js/V8: the JavaScript heap is V8's own, so RSS/malloc-live is meaningless; compare process.memoryUsage() heapTotal with heapUsed"
	case Python:
		return "Python: pymalloc serves small objects from its own arenas, so RSS/malloc-live is meaningless; use tracemalloc, or PYTHONMALLOC=malloc to route everything through malloc"
	}
	return "allocator not recognised (not glibc, jemalloc, tcmalloc or mimalloc; a musl or unknown static allocator?), so the RSS/live ratio would not mean anything"
}

func advice(a Allocator, pm *ProcessMem) []string {
	switch a {
	case Glibc:
		var out []string
		if pm != nil && (pm.GlibcArenas > 0 || pm.Threads > 1) {
			out = append(out, fmt.Sprintf("set MALLOC_ARENA_MAX=2: glibc gives threads their own arenas (up to 8 per core; %d extra arena heap(s) and %d thread(s) seen), each a separate 64 MiB heap whose free memory no other arena can reuse", pm.GlibcArenas, pm.Threads))
		}
		out = append(out,
			"call malloc_trim(0) after large frees (it returns free pages inside the heap to the kernel, which free() alone only does at the heap top), or lower MALLOC_TRIM_THRESHOLD_ (e.g. 131072) and MALLOC_MMAP_THRESHOLD_ so big blocks are mmapped and freed to the kernel",
			"try jemalloc without rebuilding: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (Debian package libjemalloc2); it returns unused pages by itself",
		)
		return out
	case Jemalloc:
		return []string{
			"let jemalloc return free pages sooner: MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0 (purges dirty pages after 1 s from a background thread instead of 10 s on allocation calls)",
			"if many threads allocate, cap arenas with MALLOC_CONF=narenas:2 (one set of partly used pages per arena)",
			"pages pinned by a few long-lived small objects stay resident whatever the decay: check the top live stacks for such survivors",
		}
	case Mimalloc:
		return []string{
			"make mimalloc return freed pages sooner: MIMALLOC_RESET_DELAY=0 (mimalloc 2.0; MIMALLOC_PURGE_DELAY=0 from 2.1), and call mi_collect(true) after large frees",
		}
	case Tcmalloc:
		return []string{
			"make tcmalloc release memory: TCMALLOC_RELEASE_RATE=10 (gperftools) or call MallocExtension::ReleaseFreeMemory(); cap caches with TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES",
		}
	}
	return nil
}

// human formats a byte count with binary units.
func human(b uint64) string { return pprofout.HumanBytes(int64(b)) }

// AssessProcess judges process pid in one call: it detects the allocator,
// reads /proc (RssAnon, threads, arenas) and compares RssAnon with live, the
// live malloc bytes memprof measured for that process.
func AssessProcess(pid int, live uint64) (Verdict, error) {
	pm, err := ReadProcess(pid)
	if err != nil {
		return Verdict{}, err
	}
	a, _ := DetectAllocator(pid, nil)
	return Assess(a, pm.RssAnon, live, &pm), nil
}

// Bounded judges a process whose live bytes are only partly known: live
// were seen, and up to unseen more may exist (blocks allocated before the
// profiler attached). The verdict of Assess stands only when it does not
// depend on the unseen part: an alarm must hold with live+unseen too (all
// unseen memory live), a healthy or low ratio with live alone. Otherwise no
// verdict is given: the figures are reported with why.
func Bounded(a Allocator, rss, live, unseen uint64, pm *ProcessMem, why string) Verdict {
	v := Assess(a, rss, live, pm)
	if unseen == 0 || !v.Covered {
		return v
	}
	hi := Assess(a, rss, live+unseen, pm)
	if v.Alarm && hi.Alarm {
		v.Summary += fmt.Sprintf(" (holds even if all %s of allocator memory mapped before the attach held live blocks)", human(unseen))
		return v
	}
	if !v.Alarm {
		return v
	}
	v.Withheld = fmt.Sprintf("%s; up to %s of blocks may predate it, enough to explain the excess", why, human(unseen))
	v.Summary = fmt.Sprintf("no verdict: %s (%s of anonymous RSS, %s live seen, ratio %.2f with what was seen; %.2f if all of that memory were live)",
		v.Withheld, human(rss), human(live), v.Ratio, hi.Ratio)
	v.Alarm = false
	v.Advice = nil
	return v
}
