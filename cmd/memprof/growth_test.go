package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/memprof/memprof/internal/series"
	"github.com/memprof/memprof/internal/testprog"
)

func TestParseGrowthLimit(t *testing.T) {
	for in, want := range map[string]float64{"1MiB/min": 1 << 20, "512KiB/s": 512 << 10 * 60, "10MB/h": 10e6 / 60, " 2 GiB / min ": 2 << 30, "": -1} {
		got, err := parseGrowthLimit(in)
		if err != nil || math.Abs(got-want) > 1e-6 {
			t.Errorf("parseGrowthLimit(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"1MiB", "fast", "1XB/min", "-1MiB/min"} {
		if _, err := parseGrowthLimit(bad); err == nil {
			t.Errorf("parseGrowthLimit(%q) accepted", bad)
		}
	}
}

// rssRead is one reading of the target's /proc/PID/status by the test.
type rssRead struct {
	at  time.Time
	rss int64
}

// watchRSS reads VmRSS of the child of parent each 50 ms until stop.
func watchRSS(parent int, stop <-chan struct{}) []rssRead {
	var out []rssRead
	child := 0
	for {
		select {
		case <-stop:
			return out
		case <-time.After(50 * time.Millisecond):
		}
		if child == 0 {
			child = childOf(parent)
			continue
		}
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", child))
		if err != nil {
			continue
		}
		at := time.Now()
		for _, l := range strings.Split(string(data), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				out = append(out, rssRead{at, kb << 10})
			}
		}
	}
}

func childOf(parent int) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(data)
		if i := strings.LastIndexByte(s, ')'); i > 0 {
			if f := strings.Fields(s[i+1:]); len(f) > 2 && f[1] == strconv.Itoa(parent) && strings.Contains(s[:i], "(growth_demo") {
				return pid
			}
		}
	}
	return 0
}

type jsonStack struct {
	Frames     []string `json:"frames"`
	InuseBytes int64    `json:"inuse_bytes"`
	AllocBytes int64    `json:"alloc_bytes"`
	Growth     struct {
		Trend      string  `json:"trend"`
		Confidence string  `json:"confidence"`
		Rate       float64 `json:"growth_bytes_per_min"`
	} `json:"growth"`
	Series []int64 `json:"series_inuse_bytes"`
}

// TestGrowthReportAndLeakGate records testdata/growth_demo.c (a leak of
// 4 MiB/s, a 32 MiB cache filled in 2 s, 5 MiB/s of churn, for 8 s) at the
// default rate and at rate 1 with the leak gate: the gate fails naming
// leak_grow, the report classifies the three stacks, the series' RSS agrees
// with the test's own reads of /proc, and at rate 1 the total live bytes
// agree with RssAnon. Without the leak the gate passes.
func TestGrowthReportAndLeakGate(t *testing.T) {
	testprog.RequireRoot(t)
	memprof := buildMemprof(t)
	demo := testprog.Build(t, "growth_demo.c")
	dir := t.TempDir()
	for _, rate := range []string{"524288", "1"} {
		out := filepath.Join(dir, "heap-"+rate+".pb.gz")
		cmd := exec.Command(memprof, "record", "--sample-rate", rate, "--fail-on-growth", "1MiB/min", "-o", out, "--", demo, "8")
		var buf bytes.Buffer
		cmd.Stdout, cmd.Stderr = &buf, &buf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		var reads []rssRead
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); reads = watchRSS(cmd.Process.Pid, stop) }()
		err := cmd.Wait()
		close(stop)
		wg.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != ExitGrowth {
			t.Fatalf("rate %s: record --fail-on-growth exited with %v, want status %d\n%s", rate, err, ExitGrowth, buf.String())
		}
		gate := buf.String()[strings.Index(buf.String(), "leak gate:"):]
		if !strings.Contains(gate, "leak_grow") || strings.Contains(gate, "cache_fill") || strings.Contains(gate, "churn_work") {
			t.Errorf("rate %s: the gate must name leak_grow only:\n%s", rate, gate)
		}

		js, err := exec.Command(memprof, "report", "--format", "json", out).Output()
		if err != nil {
			t.Fatalf("report --format json: %v", err)
		}
		var rep struct {
			TimesS    []float64        `json:"times_s"`
			Total     []int64          `json:"total_inuse_bytes"`
			Processes []series.Process `json:"processes"`
			Stacks    []jsonStack      `json:"stacks"`
		}
		if err := json.Unmarshal(js, &rep); err != nil {
			t.Fatal(err)
		}
		want := map[string]string{"leak_grow": "growing", "cache_fill": "steady", "churn_work": "temporary"}
		found := map[string]jsonStack{}
		for _, st := range rep.Stacks {
			for fn := range want {
				if len(st.Frames) > 0 && strings.HasPrefix(st.Frames[0], fn+" ") {
					found[fn] = st
				}
			}
		}
		for fn, trend := range want {
			st, ok := found[fn]
			switch {
			case !ok:
				t.Errorf("rate %s: no stack %s in the report", rate, fn)
			case st.Growth.Trend != trend:
				t.Errorf("rate %s: %s classified %s (%s), want %s", rate, fn, st.Growth.Trend, st.Growth.Confidence, trend)
			case trend != "temporary" && len(st.Series) != len(rep.TimesS):
				t.Errorf("rate %s: %s has %d points, the time axis %d", rate, fn, len(st.Series), len(rep.TimesS))
			}
		}
		t.Logf("rate %s: %d points; leak %.1f MiB/min (%s), cache %s, churn %s",
			rate, len(rep.TimesS), found["leak_grow"].Growth.Rate/(1<<20), found["leak_grow"].Growth.Confidence,
			found["cache_fill"].Growth.Trend, found["churn_work"].Growth.Trend)
		if rate == "1" {
			// True rate 4 MiB/s = 240 MiB/min; the program's ticks may
			// slip on a loaded machine: allow -25%, +10%.
			if r := found["leak_grow"].Growth.Rate / (240 << 20); r < 0.75 || r > 1.1 {
				t.Errorf("leak rate %.1f MiB/min at rate 1, want 240 (-25%%, +10%%)", found["leak_grow"].Growth.Rate/(1<<20))
			}
		}

		// The series' RSS against the test's own /proc reads at the
		// nearest instant (within 40 ms): RSS grows by at most ~20 MiB/s
		// here (cache fill plus leak), so 40 ms is 0.8 MiB; tolerance
		// 1.5 MiB + 3%.
		s, err := series.ReadFile(series.SidecarPath(out))
		if err != nil {
			t.Fatal(err)
		}
		if len(s.Processes) != 1 {
			t.Fatalf("rate %s: series has %d processes, want 1", rate, len(s.Processes))
		}
		p := s.Processes[0]
		compared, maxRSS, maxLive := 0, 0.0, 0.0
		for i, ms := range s.TimesMS {
			// The first half second is exec and dynamic loading: RSS
			// jumps by megabytes within a millisecond there.
			if p.RSS[i] == series.Absent || ms < 500 {
				continue
			}
			at := s.Start.Add(time.Duration(ms) * time.Millisecond)
			best := -1
			for j := range reads {
				if best < 0 || absDur(reads[j].at.Sub(at)) < absDur(reads[best].at.Sub(at)) {
					best = j
				}
			}
			if best < 0 || absDur(reads[best].at.Sub(at)) > 40*time.Millisecond {
				continue
			}
			compared++
			d := math.Abs(float64(p.RSS[i] - reads[best].rss))
			maxRSS = max(maxRSS, d)
			if d > 1.5*(1<<20)+0.03*float64(reads[best].rss) {
				t.Errorf("rate %s: at %.2f s series RSS %d, /proc read %d (%v apart)", rate, float64(ms)/1000, p.RSS[i], reads[best].rss, reads[best].at.Sub(at))
			}
			// At rate 1 the live bytes are exact: RssAnon holds them plus
			// glibc's chunk headers and top pad and the program's own
			// pages (under 3 MiB here), and they are at least as large
			// as RssAnon minus that: tolerance 3 MiB + 5%.
			if rate == "1" && p.RssAnon[i] > 8<<20 {
				d := math.Abs(float64(p.RssAnon[i] - rep.Total[i]))
				maxLive = max(maxLive, d/float64(p.RssAnon[i]))
				if d > 3*(1<<20)+0.05*float64(p.RssAnon[i]) {
					t.Errorf("at %.2f s total live %d vs RssAnon %d", float64(ms)/1000, rep.Total[i], p.RssAnon[i])
				}
			}
		}
		if compared < 10 {
			t.Errorf("rate %s: only %d series points had a /proc read within 40 ms (%d reads)", rate, compared, len(reads))
		}
		t.Logf("rate %s: %d RSS points compared with /proc: largest difference %.2f MiB; at rate 1 total live vs RssAnon: largest %.1f%%", rate, compared, maxRSS/(1<<20), 100*maxLive)
		if rate == "524288" {
			checkHTML(t, memprof, out, dir)
		}
	}

	// Without the leak the gate passes: the cache plateaus, churn is
	// temporary.
	out := filepath.Join(dir, "noleak.pb.gz")
	b, err := exec.Command(memprof, "record", "--fail-on-growth", "1MiB/min", "-o", out, "--", demo, "8", "noleak").CombinedOutput()
	if err != nil || !strings.Contains(string(b), "leak gate: no stack growing faster than 1.0 MiB/min") {
		t.Fatalf("record without the leak: %v\n%s", err, b)
	}
}

func absDur(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// checkHTML writes the HTML report of the demo's profile, opens it in a
// headless Chromium and checks the page it drew: no console messages or
// script errors, the flame graph's frames and the timeline's lines in the
// DOM, the three stacks in the growth table, and a screenshot.
// MEMPROF_REPORT_PNG=path keeps the screenshot (internal/report/screenshot.png, shown in the README).
func checkHTML(t *testing.T, memprof, profile, dir string) {
	t.Helper()
	html := filepath.Join(dir, "report.html")
	if b, err := exec.Command(memprof, "report", "--html", html, profile).CombinedOutput(); err != nil {
		t.Fatalf("report --html: %v\n%s", err, b)
	}
	chrome, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium not found: `make deps` installs it (Debian package chromium)")
	}
	run := func(hash string, extra ...string) (string, string) {
		args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
			"--disable-background-networking", "--disable-component-update", "--disable-sync",
			"--user-data-dir=" + t.TempDir(), "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
			"--hide-scrollbars", "--window-size=1280,1150"}, extra...)
		cmd := exec.Command(chrome, append(args, "file://"+html+hash)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("chromium: %v\n%s", err, errb.String())
			}
		case <-time.After(90 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("chromium did not finish in 90 s")
		}
		return out.String(), errb.String()
	}
	dom, logs := run("", "--dump-dom")
	// The same page with the alloc_space flame graph and a window of
	// 3-7 s preset by its address: churn_work is in that flame graph (it
	// holds nothing live), and the leak rose inside the window.
	dom2, logs2 := run("#type=alloc_space&window=3-7", "--dump-dom")
	for _, l := range strings.Split(logs+logs2, "\n") {
		if strings.Contains(l, ":CONSOLE") {
			t.Errorf("console message from the page: %s", l)
		}
	}
	if !strings.Contains(dom2, `name="churn_work `) || !strings.Contains(dom2, "window 3.0–7.0 s selected") {
		t.Errorf("switching the flame graph to alloc_space or selecting a window failed")
	}
	row := ""
	if i := strings.Index(dom2, `data-leaf="leak_grow `); i >= 0 {
		row = dom2[i:]
		if j := strings.Index(row, "</tr>"); j >= 0 {
			row = row[:j]
		}
	}
	// The "in window" cell: "+18.6 MiB (291.4 MiB/min)".
	if !strings.Contains(row, `MiB/min)</td>`) || !strings.Contains(row, `<td class="num">+`) {
		t.Errorf("no rise of leak_grow shown inside the selected window")
	}
	if !strings.Contains(dom2, `<pre id="errors"></pre>`) {
		t.Errorf("script errors with #type=alloc_space&window=3-7")
	}
	if !strings.Contains(dom, `data-ready="1"`) {
		t.Errorf("the page's script did not finish (no data-ready)")
	}
	if !strings.Contains(dom, `<pre id="errors"></pre>`) {
		t.Errorf("script errors on the page: %s", dom[strings.Index(dom, `<pre id="errors">`):][:300])
	}
	if n := strings.Count(dom, `class="frame`); n < 7 {
		t.Errorf("flame graph: %d frames drawn, want at least 7 (all, __libc_start_call_main, 2 x main, leak_grow, cache_fill...)", n)
	}
	for _, want := range []string{`class="line line-total"`, `class="line line-rss"`, `class="line line-stack"`,
		`data-trend="growing" data-leaf="leak_grow `, `data-trend="steady" data-leaf="cache_fill `, `data-trend="temporary" data-leaf="churn_work `,
		`name="leak_grow `, `name="cache_fill `} {
		if !strings.Contains(dom, want) {
			t.Errorf("the page lacks %s", want)
		}
	}
	png := filepath.Join(dir, "report.png")
	run("", "--screenshot="+png)
	st, err := os.Stat(png)
	if err != nil || st.Size() < 20000 {
		t.Fatalf("screenshot: %v (size %d)", err, sizeOf(st))
	}
	if keep := os.Getenv("MEMPROF_REPORT_PNG"); keep != "" {
		data, _ := os.ReadFile(png)
		if err := os.WriteFile(keep, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func sizeOf(st os.FileInfo) int64 {
	if st == nil {
		return 0
	}
	return st.Size()
}
