package report

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/growth"
	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/pprofout"
)

// demo writes a profile and its series with a leak, a cache, churn and a
// stack whose name is hostile markup, at rate 1, 40 points 250 ms apart.
func demo(t testing.TB, dir string) string {
	t.Helper()
	loc := func(fn string) *pprofout.Location {
		return &pprofout.Location{Lines: []pprofout.Line{{Function: fn, File: "x.c", Line: 7}}}
	}
	mainLoc := loc("main")
	leak, cache, churn, evil := loc("leak"), loc("cache"), loc("churn"), loc(`</script><img src=x onerror=alert(1)>`)
	stacks := map[string][]*pprofout.Location{"leak": {leak, mainLoc}, "cache": {cache, mainLoc}, "churn": {churn, mainLoc}, "evil": {evil, mainLoc}}
	start := time.Unix(1700000000, 0)
	p := &pprofout.Profile{SampleRate: 1, Start: start, Duration: 10 * time.Second, Comments: []string{
		pprofout.MetaComment("frag", "pid 1 (x): healthy"), pprofout.MetaComment("lost_ringbuf_full", "3")},
		Samples: []pprofout.Sample{
			{Stack: stacks["leak"], Size: 1 << 20, AllocCount: 40, InuseCount: 40, Labels: map[string]string{"pid": "1"}},
			{Stack: stacks["cache"], Size: 1 << 20, AllocCount: 8, InuseCount: 8, Labels: map[string]string{"pid": "1"}},
			{Stack: stacks["churn"], Size: 4096, AllocCount: 10000, InuseCount: 0, Labels: map[string]string{"pid": "1"}},
			{Stack: stacks["evil"], Size: 64, AllocCount: 1, InuseCount: 1, Labels: map[string]string{"pid": "1"}},
		}}
	path := filepath.Join(dir, "heap.pb.gz")
	if err := pprofout.WriteFile(path, p); err != nil {
		t.Fatal(err)
	}
	b := series.NewBuilder(start, 1, 250*time.Millisecond, 0)
	keys := map[string]series.Key{"leak": {Pid: 1, StackID: 1}, "cache": {Pid: 1, StackID: 2}, "churn": {Pid: 1, StackID: 3}, "evil": {Pid: 1, StackID: 4}}
	for i := 0; i < 40; i++ {
		live := map[series.Key]int64{
			keys["leak"]:  int64(i+1) << 20,
			keys["cache"]: int64(min(i+1, 8)) << 20,
			keys["evil"]:  64,
		}
		b.Add(start.Add(time.Duration(i)*250*time.Millisecond), live, map[int]bool{1: true},
			[]series.ProcPoint{{Pid: 1, Comm: "x", RSS: int64(i+10) << 20, RssAnon: int64(i+9) << 20}}, nil)
	}
	byKey := map[series.Key]string{}
	for name, k := range keys {
		byKey[k] = name
	}
	s := b.Finish(func(k series.Key) []string { return pprofout.Frames(stacks[byKey[k]]) })
	if err := series.WriteFile(series.SidecarPath(path), s); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadClassifiesAndOrders(t *testing.T) {
	path := demo(t, t.TempDir())
	r, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if r.SeriesMissing != "" || len(r.TimesS) != 40 || len(r.Processes) != 1 {
		t.Fatalf("series not joined: %q, %d points", r.SeriesMissing, len(r.TimesS))
	}
	got := map[string]growth.Trend{}
	for _, st := range r.Stacks {
		got[strings.Fields(st.Frames[0])[0]] = st.Growth.Trend
	}
	if got["leak"] != growth.Growing || got["cache"] != growth.Steady || got["churn"] != growth.Temporary {
		t.Fatalf("trends %v", got)
	}
	if !strings.HasPrefix(r.Stacks[0].Frames[0], "leak ") || r.Stacks[len(r.Stacks)-1].Growth.Trend != growth.Temporary {
		t.Errorf("order: growing first, temporary last: %v", r.Stacks)
	}
	if r.Stacks[0].InuseBytes != 40<<20 || r.Stacks[0].AllocBytes != 40<<20 {
		t.Errorf("leak totals %d/%d", r.Stacks[0].InuseBytes, r.Stacks[0].AllocBytes)
	}
	// 1 MiB per 250 ms = 240 MiB/min, exact at rate 1.
	if rate := r.Stacks[0].Growth.RatePerMin; rate != 240<<20 {
		t.Errorf("leak rate %v, want %d", rate, 240<<20)
	}
	if l := r.Leaks(1 << 20); len(l) != 1 || !strings.HasPrefix(l[0].Frames[0], "leak ") {
		t.Errorf("leak gate at 1 MiB/min: %v", l)
	}
	if l := r.Leaks(300 << 20); len(l) != 0 {
		t.Errorf("leak gate at 300 MiB/min trips: %v", l)
	}
	if len(r.Fragmentation) != 1 || len(r.Lost) != 1 {
		t.Errorf("comments: frag %v lost %v", r.Fragmentation, r.Lost)
	}
	var text bytes.Buffer
	if err := WriteGrowth(&text, r, 10, 4); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"what grew (40 points over 9.8 s", "1 growing", "+240.0 MiB/min", "▁▂▂▃▃▄▄▄▄▅▅▅▅▆▆▆▆▇▇▇▇▇██", "RSS pid 1 (x) 10.0 MiB -> 49.0 MiB"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}
	var js bytes.Buffer
	if err := WriteJSON(&js, r); err != nil {
		t.Fatal(err)
	}
	var back map[string]any
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || back["stacks"] == nil {
		t.Fatalf("JSON: %v", err)
	}
}

func TestLoadWithoutSeries(t *testing.T) {
	dir := t.TempDir()
	path := demo(t, dir)
	os.Remove(series.SidecarPath(path))
	r, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.SeriesMissing, "no series file") || r.Trends[growth.Unknown] != len(r.Stacks) {
		t.Fatalf("missing series: %q %v", r.SeriesMissing, r.Trends)
	}
	if l := r.Leaks(0); len(l) != 0 {
		t.Fatalf("leaks without a series: %v", l)
	}
	// A series of another recording under the same name is not used.
	other := &series.Series{Version: series.Version, Start: time.Unix(5, 0)}
	if err := series.WriteFile(series.SidecarPath(path), other); err != nil {
		t.Fatal(err)
	}
	if r, err := Load(path); err != nil || !strings.Contains(r.SeriesMissing, "another recording") {
		t.Fatalf("stale series: %v %q", err, r.SeriesMissing)
	}
	os.WriteFile(series.SidecarPath(path), []byte("junk"), 0o644)
	if r, err := Load(path); err != nil || !strings.Contains(r.SeriesMissing, "not gzip") {
		t.Fatalf("corrupt series: %v %q", err, r.SeriesMissing)
	}
}

func TestHTMLIsSelfContainedAndEscaped(t *testing.T) {
	r, err := Load(demo(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteHTML(&buf, r); err != nil {
		t.Fatal(err)
	}
	h := buf.String()
	if strings.Contains(h, "<img src=x") || strings.Count(h, "</script>") != strings.Count(h, "<script") {
		t.Fatal("a function name broke out of the page's data")
	}
	for _, bad := range []string{"http://", "https://"} {
		for _, tag := range []string{`src="` + bad, `href="` + bad} {
			if strings.Contains(h, tag) {
				t.Errorf("the page loads %s", tag)
			}
		}
	}
	for _, want := range []string{"flamegraph", "d3-flame-graph", `"leak x.c:7"`, `"inuse_space"`} {
		if !strings.Contains(h, want) {
			t.Errorf("page lacks %s", want)
		}
	}
}

func TestSparklineAndFlame(t *testing.T) {
	if s := sparkline([]int64{series.Absent, 0, 4, 8}, 10); s != " ▁▅█" {
		t.Errorf("sparkline %q", s)
	}
	if s := sparkline([]int64{1, 2, 3, 4, 5, 6, 7, 8}, 4); s != "▃▅▆█" {
		t.Errorf("bucketed sparkline %q", s)
	}
}

// An OOM post-mortem's page shows the kill from the report next to it.
func TestHTMLShowsTheKill(t *testing.T) {
	dir := t.TempDir()
	prof := demo(t, dir)
	oomProf := filepath.Join(dir, "oom-20250101-000000-x-1.pb.gz")
	if err := os.Rename(prof, oomProf); err != nil {
		t.Fatal(err)
	}
	js := `{"Pid": 1, "Comm": "x", "Kind": "cgroup-limit", "CgroupPath": "/sys/fs/cgroup/memory/t", "Limit": 67108864, "Usage": 67100000, "AnonRSS": 66000000}`
	if err := os.WriteFile(filepath.Join(dir, "oom-20250101-000000-x-1.json"), []byte(js), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := Load(oomProf)
	if err != nil {
		t.Fatal(err)
	}
	if r.OOM == nil || r.OOM.Kind != "cgroup-limit" || r.OOM.Limit != 64<<20 {
		t.Fatalf("kill not read: %+v", r.OOM)
	}
	var buf bytes.Buffer
	if err := WriteHTML(&buf, r); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `"Kind":"cgroup-limit"`) || !strings.Contains(buf.String(), "OOM kill of pid") {
		t.Fatal("the page lacks the kill")
	}
}

// Beyond MaxClassified stacks, the smallest are left unclassified and say so.
func TestAnalyzeClassifiesTheLargest(t *testing.T) {
	n := MaxClassified + 2
	prof := &pprofout.Profile{SampleRate: 1}
	s := &series.Series{Version: series.Version, SampleRate: 1}
	for i := 0; i < 12; i++ {
		s.TimesMS = append(s.TimesMS, int64(i*1000))
	}
	for i := 0; i < n; i++ {
		loc := &pprofout.Location{Lines: []pprofout.Line{{Function: "f" + strconv.Itoa(i)}}}
		prof.Samples = append(prof.Samples, pprofout.Sample{Stack: []*pprofout.Location{loc}, Size: uint64(i + 1), AllocCount: 1, InuseCount: 1, Labels: map[string]string{}})
		v := make([]int64, 12)
		for j := range v {
			v[j] = int64(i + 1)
		}
		s.Stacks = append(s.Stacks, series.Stack{Frames: []string{"f" + strconv.Itoa(i)}, Inuse: v})
	}
	built, err := pprofout.Build(prof)
	if err != nil {
		t.Fatal(err)
	}
	r := Analyze(built, s)
	if r.Trends[growth.Unknown] != 2 || r.Trends[growth.Steady] != MaxClassified {
		t.Fatalf("trends %v", r.Trends)
	}
	for _, st := range r.Stacks {
		if st.Growth.Trend == growth.Unknown && st.Frames[0] != "f0" && st.Frames[0] != "f1" {
			t.Errorf("%s left unclassified, not one of the two smallest", st.Frames[0])
		}
	}
}

// TestHostileLongNameBounded: a profile whose function name is 50 MB, on 20
// distinct stacks, is reported (text, JSON, HTML) with the name cut to
// pprofout.MaxStringBytes and bounded memory: before the cut every stack,
// row and flame-graph node copied the whole name (≥ 1 GB here).
func TestHostileLongNameBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("a resource-bomb test (hundreds of MiB parsed): in the root tier, not in the -short -race unit tier, where the race detector makes it 10-15x slower")
	}
	long := strings.Repeat("A", 50<<20)
	p := &profile.Profile{
		SampleType: []*profile.ValueType{{Type: "inuse_space", Unit: "bytes"}},
		PeriodType: &profile.ValueType{Type: "space", Unit: "bytes"},
		Period:     1,
	}
	fLong := &profile.Function{ID: 1, Name: long, Filename: long}
	p.Function = append(p.Function, fLong)
	lLong := &profile.Location{ID: 1, Line: []profile.Line{{Function: fLong}}}
	p.Location = append(p.Location, lLong)
	for i := 0; i < 20; i++ {
		f := &profile.Function{ID: uint64(i + 2), Name: "caller" + strconv.Itoa(i)}
		l := &profile.Location{ID: uint64(i + 2), Line: []profile.Line{{Function: f}}}
		p.Function = append(p.Function, f)
		p.Location = append(p.Location, l)
		p.Sample = append(p.Sample, &profile.Sample{Location: []*profile.Location{lLong, l}, Value: []int64{int64(1000 * (i + 1))},
			Label: map[string][]string{"comm": {long}}})
	}
	path := filepath.Join(t.TempDir(), "hostile.pb.gz")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Write(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	p = nil // only the file is read from here on

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	r, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := WriteGrowth(&out, r, 20, 8); err != nil {
		t.Fatal(err)
	}
	if err := WriteJSON(&out, r); err != nil {
		t.Fatal(err)
	}
	if err := WriteHTML(&out, r); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	grew := int64(after.TotalAlloc - before.TotalAlloc)
	t.Logf("50 MB name on 20 stacks: %d MiB allocated, %d KiB of output", grew>>20, out.Len()>>10)
	// Reading costs about twice the decompressed 50 MB (the protobuf and
	// its parse); rendering must add little.
	if grew > 400<<20 {
		t.Errorf("allocated %d MiB, want at most 400", grew>>20)
	}
	if out.Len() > 8<<20 {
		t.Errorf("wrote %d MiB, want at most 8", out.Len()>>20)
	}
	if !strings.Contains(out.String(), "bytes cut]") {
		t.Error("the long name is not marked as cut")
	}
}

// TestLoadRSSProfile: record --rss writes no series; the report says why
// without blaming an older memprof.
func TestLoadRSSProfile(t *testing.T) {
	fn := &profile.Function{ID: 1, Name: "leak"}
	loc := &profile.Location{ID: 1, Line: []profile.Line{{Function: fn}}}
	p := &profile.Profile{
		SampleType: []*profile.ValueType{{Type: pprofout.RSSSpace, Unit: "bytes"}},
		Sample:     []*profile.Sample{{Location: []*profile.Location{loc}, Value: []int64{4 << 20}}},
		Location:   []*profile.Location{loc},
		Function:   []*profile.Function{fn},
	}
	path := filepath.Join(t.TempDir(), "rss.pb.gz")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Write(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	r, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.SeriesMissing, "an RSS profile has no series") || strings.Contains(r.SeriesMissing, "older memprof") {
		t.Fatalf("SeriesMissing %q", r.SeriesMissing)
	}
}
