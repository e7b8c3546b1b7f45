package rss

import (
	"testing"

	"github.com/cilium/ebpf"

	mbpf "github.com/memprof/memprof/bpf"
	"github.com/memprof/memprof/internal/testprog"
)

// loadLogic loads rss_test.bpf.c: the decision functions of bpf/rss.h on
// explicit inputs, run with BPF_PROG_RUN.
func loadLogic(t *testing.T, sampleAll bool) *mbpf.RssTestObjects {
	t.Helper()
	testprog.RequireRoot(t)
	spec, err := mbpf.LoadRssTest()
	if err != nil {
		t.Fatal(err)
	}
	if sampleAll {
		if err := spec.Variables["rss_sample_all"].Set(uint32(1)); err != nil {
			t.Fatal(err)
		}
	}
	var o mbpf.RssTestObjects
	if err := spec.LoadAndAssign(&o, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return &o
}

func runLogic(t *testing.T, o *mbpf.RssTestObjects, in mbpf.RssTestRssTestCtx) mbpf.RssTestRssTestCtx {
	t.Helper()
	out := in
	if _, err := o.RssTestDecide.Run(&ebpf.RunOptions{Context: in, ContextOut: &out}); err != nil {
		t.Fatalf("BPF_PROG_RUN: %v", err)
	}
	return out
}

func TestTargetFilter(t *testing.T) {
	o := loadLogic(t, false)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(o.RssPids.Put(uint32(100), uint8(mbpf.RssRssTargetFlagRT_TARGET)))
	must(o.RssPids.Put(uint32(101), uint8(mbpf.RssRssTargetFlagRT_FOLLOW_FORKS))) // follow flag alone: not a target
	must(o.RssMemcgs.Put(uint64(5000), uint8(1)))
	must(o.RssCgroups.Put(uint64(7000), uint8(1)))
	cases := []struct {
		name          string
		kinds         uint32
		tgid          uint32
		memcg, cgroup uint64
		want          uint32
	}{
		{"no kinds in use", 0, 100, 5000, 7000, 0},
		{"pid target", RSSKindPids, 100, 0, 0, 1},
		{"pid not a target", RSSKindPids, 102, 0, 0, 0},
		{"follow-forks flag only", RSSKindPids, 101, 0, 0, 0},
		{"v1 memcg target", RSSKindMemcgs, 1, 5000, 0, 1},
		{"memcg kind unused", RSSKindPids, 1, 5000, 0, 0},
		{"memcg 0 (unknown)", RSSKindMemcgs, 1, 0, 0, 0},
		{"v2 cgroup target", RSSKindCgroups, 1, 0, 7000, 1},
		{"v2 id in memcg map only", RSSKindCgroups, 1, 0, 5000, 0},
		{"all kinds, none match", RSSKindPids | RSSKindMemcgs | RSSKindCgroups, 1, 1, 1, 0},
		{"all kinds, cgroup matches", RSSKindPids | RSSKindMemcgs | RSSKindCgroups, 1, 1, 7000, 1},
	}
	for _, c := range cases {
		must(o.RssFilterKinds.Set(c.kinds))
		// Generation 1 against a zero (absent) cached verdict: the maps decide.
		got := runLogic(t, o, mbpf.RssTestRssTestCtx{Tgid: c.tgid, Memcg: c.memcg, Cgroup: c.cgroup, Countdown: 1 << 40, Size: 4096, Gap: 1, Gen: 1})
		if got.IsTarget != c.want {
			t.Errorf("%s: is_target = %d, want %d", c.name, got.IsTarget, c.want)
		}
	}
}

// A thread's cached target verdict is used while the target generation
// and its css_set are unchanged, and taken again from the maps otherwise
// (targets changed, the thread moved to other cgroups).
func TestCachedVerdict(t *testing.T) {
	o := loadLogic(t, false)
	if err := o.RssPids.Put(uint32(100), uint8(mbpf.RssRssTargetFlagRT_TARGET)); err != nil {
		t.Fatal(err)
	}
	if err := o.RssMemcgs.Put(uint64(5000), uint8(1)); err != nil {
		t.Fatal(err)
	}
	if err := o.RssFilterKinds.Set(uint32(RSSKindPids | RSSKindMemcgs)); err != nil {
		t.Fatal(err)
	}
	const cssA, cssB = 0xffff888000100000, 0xffff888000200000
	type v = mbpf.RssTestRssVerdict
	cases := []struct {
		name     string
		cached   v
		gen, css uint64
		tgid     uint32
		memcg    uint64
		want     uint32 // is_target
		wantHit  uint32
		wantV    v
	}{
		{"no verdict yet: the maps decide, verdict stored", v{}, 1, cssA, 100, 0, 1, 0, v{Gen: 1, Css: cssA, Target: 1}},
		{"fresh target verdict: the maps are not read", v{Gen: 1, Css: cssA, Target: 1}, 1, cssA, 102, 0, 1, 1, v{Gen: 1, Css: cssA, Target: 1}},
		{"fresh non-target verdict", v{Gen: 1, Css: cssA}, 1, cssA, 100, 0, 0, 1, v{Gen: 1, Css: cssA}},
		{"targets changed: generation bumped", v{Gen: 1, Css: cssA}, 2, cssA, 100, 0, 1, 0, v{Gen: 2, Css: cssA, Target: 1}},
		{"moved into a target memcg: other css_set", v{Gen: 1, Css: cssA}, 1, cssB, 102, 5000, 1, 0, v{Gen: 1, Css: cssB, Target: 1}},
		{"moved out of the target memcg: other css_set", v{Gen: 1, Css: cssA, Target: 1}, 1, cssB, 102, 6000, 0, 0, v{Gen: 1, Css: cssB}},
		{"a poll: generation bumped, same css_set", v{Gen: 3, Css: cssA, Target: 1}, 4, cssA, 102, 6000, 0, 0, v{Gen: 4, Css: cssA}},
	}
	for _, c := range cases {
		got := runLogic(t, o, mbpf.RssTestRssTestCtx{Tgid: c.tgid, Memcg: c.memcg, Countdown: 1 << 40, Size: 4096, Gap: 1,
			V: c.cached, Gen: c.gen, Css: c.css})
		if got.IsTarget != c.want || got.VerdictHit != c.wantHit || got.V != c.wantV {
			t.Errorf("%s: is_target %d, cached verdict used %d, verdict now %+v; want %d, %d, %+v",
				c.name, got.IsTarget, got.VerdictHit, got.V, c.want, c.wantHit, c.wantV)
		}
	}
}

func TestSamplingDecision(t *testing.T) {
	o := loadLogic(t, false)
	cases := []struct {
		name          string
		countdown     int64
		size          uint64
		gap           int64
		wantSampled   uint32
		wantCountdown int64
	}{
		{"far from a sample: count down", 100000, 4096, 555, 0, 100000 - 4096},
		{"exactly reaches the sample", 4096, 4096, 555, 1, 555},
		{"crosses the sample", 100, 4096, 555, 1, 555},
		{"new CPU: countdown starts from the gap", 0, 4096, 10000, 0, 10000 - 4096},
		{"new CPU, gap within the fault", 0, 4096, 100, 1, 100},
		{"huge page crosses", 1 << 20, 2 << 20, 777, 1, 777},
		{"bad gap is clamped to 1 byte", 0, 4096, 0, 1, 1},
	}
	for _, c := range cases {
		got := runLogic(t, o, mbpf.RssTestRssTestCtx{Countdown: c.countdown, Size: c.size, Gap: c.gap})
		if got.Sampled != c.wantSampled || got.Countdown != c.wantCountdown {
			t.Errorf("%s: sampled %d countdown %d, want %d %d", c.name, got.Sampled, got.Countdown, c.wantSampled, c.wantCountdown)
		}
	}
	all := loadLogic(t, true)
	got := runLogic(t, all, mbpf.RssTestRssTestCtx{Countdown: 1 << 40, Size: 4096, Gap: 1})
	if got.Sampled != 1 || got.Countdown != 1<<40 {
		t.Errorf("sample_all: sampled %d countdown %d, want 1 and untouched", got.Sampled, got.Countdown)
	}
}

func TestTHPExpected(t *testing.T) {
	o := loadLogic(t, false)
	const (
		huge   = 0x20000000
		nohuge = 0x40000000
		m2     = 2 << 20
	)
	never, madvise, always := uint32(mbpf.RssRssThpModeTHP_NEVER), uint32(mbpf.RssRssThpModeTHP_MADVISE), uint32(mbpf.RssRssThpModeTHP_ALWAYS)
	cases := []struct {
		name                    string
		mode                    uint32
		flags, start, end, addr uint64
		want                    uint32
	}{
		{"never", never, huge, 0, 8 * m2, m2 + 5, 0},
		{"madvise without MADV_HUGEPAGE", madvise, 0, 0, 8 * m2, m2 + 5, 0},
		{"madvise with MADV_HUGEPAGE", madvise, huge, 0, 8 * m2, m2 + 5, 1},
		{"always", always, 0, 0, 8 * m2, m2 + 5, 1},
		{"always but MADV_NOHUGEPAGE", always, nohuge, 0, 8 * m2, m2 + 5, 0},
		{"aligned range starts before the mapping", always, 0, m2 + 4096, 8 * m2, m2 + 8192, 0},
		{"aligned range ends after the mapping", always, 0, 0, 2*m2 - 4096, m2 + 8192, 0},
		{"mapping exactly one huge page", always, 0, m2, 2 * m2, 2*m2 - 1, 1},
	}
	for _, c := range cases {
		got := runLogic(t, o, mbpf.RssTestRssTestCtx{Countdown: 1 << 40, Size: 4096, Gap: 1,
			ThpMode: c.mode, VmFlags: c.flags, VmStart: c.start, VmEnd: c.end, Addr: c.addr})
		if got.Thp != c.want {
			t.Errorf("%s: thp expected = %d, want %d", c.name, got.Thp, c.want)
		}
	}
}
