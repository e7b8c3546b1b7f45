package recorder

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/growth"
	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/internal/testprog"
)

// TestSeriesOfACgroup records testdata/growth_demo.c through its cgroup for
// 4 s: the series has the cgroup's usage and the process's RSS at each
// point, the usage holds the process's RssAnon, and the leak's stack rises
// while the cache's does not.
func TestSeriesOfACgroup(t *testing.T) {
	testprog.RequireRoot(t)
	demo := testprog.Build(t, "growth_demo.c")
	dir := testCgroup(t, "series", 0)
	// The shell joins the cgroup, then runs the demo: every page it
	// touches is charged there.
	cmd := exec.Command("sh", "-c", fmt.Sprintf("echo $$ > %s/cgroup.procs && exec %s 6", dir, demo))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	time.Sleep(300 * time.Millisecond)
	s, err := Start(context.Background(), Options{Cgroups: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rec := s.RecordSeries()
	time.Sleep(4 * time.Second)
	ser, err := rec.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if err := ser.Check(); err != nil {
		t.Fatal(err)
	}
	if len(ser.Cgroups) != 1 || ser.Cgroups[0].Path != dir || len(ser.Processes) != 1 {
		t.Fatalf("series has cgroups %+v and %d processes, want %s and the demo", ser.Cgroups, len(ser.Processes), dir)
	}
	u, p := ser.Cgroups[0].Usage, ser.Processes[0]
	checked := 0
	for i := range ser.TimesMS {
		if u[i] == series.Absent || p.RssAnon[i] == series.Absent {
			continue
		}
		checked++
		// The usage (read just after /proc, in the same point) holds the
		// process's anonymous memory; it may hold more (page cache,
		// kernel memory): tolerance 1 MiB below, 16 MiB above.
		if u[i] < p.RssAnon[i]-(1<<20) || u[i] > p.RSS[i]+(16<<20) {
			t.Errorf("at %d ms cgroup usage %d, process RSS %d RssAnon %d", ser.TimesMS[i], u[i], p.RSS[i], p.RssAnon[i])
		}
	}
	if checked < 10 {
		t.Fatalf("only %d points with both usage and RSS", checked)
	}
	t.Logf("%d points; usage %d -> %d, RssAnon %d -> %d; %.2f ms CPU per point", len(ser.TimesMS), u[0], u[len(u)-1], p.RssAnon[0], p.RssAnon[len(u)-1], ser.ReadMeanMS)
	trends := map[string]growth.Trend{}
	for _, st := range ser.Stacks {
		var ts, xs []float64
		for i, v := range st.Inuse {
			if v != series.Absent {
				ts, xs = append(ts, float64(ser.TimesMS[i])/1000), append(xs, float64(v))
			}
		}
		trends[strings.Fields(st.Frames[0])[0]] = growth.Classify(growth.Input{Times: ts, Live: xs, Quantum: float64(ser.SampleRate)}).Trend
	}
	if trends["leak_grow"] != growth.Growing {
		t.Errorf("leak_grow: %v, want growing (trends %v)", trends["leak_grow"], trends)
	}
	if tr, ok := trends["cache_fill"]; ok && tr == growth.Growing {
		t.Errorf("cache_fill growing after its fill")
	}
}
