package agent

import (
	"encoding/json"
	"math"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/memprof/memprof/pprofout"
)

// TestGrowthEndpoint stores twelve profiles a minute apart for one
// container, as saveProfiles does — a stack leaking 1 MiB a minute, a cache
// that filled in the first two minutes, a stack that allocates and frees —
// and reads /profiles/growth: the leak is growing at 1 MiB/min, the cache
// steady, the churn temporary; profiles older than the window are left
// out; the endpoint needs the token.
func TestGrowthEndpoint(t *testing.T) {
	dir := t.TempDir()
	tokenPath := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenPath, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tf, err := openToken(tokenPath)
	if err != nil {
		t.Fatal(err)
	}
	c := &container{labels: labelSet{Namespace: "shop", Pod: "web-0", Container: "app"}}
	a := &Agent{cfg: Config{DataDir: dir, NodeName: "node1"}, token: tf, profiled: map[string]*container{"id": c}}
	cdir := a.containerDir(c)
	if err := os.MkdirAll(cdir, 0o755); err != nil {
		t.Fatal(err)
	}
	loc := func(fn string) *pprofout.Location {
		return &pprofout.Location{Lines: []pprofout.Line{{Function: fn, File: "app.c", Line: 1}}}
	}
	mainLoc, leak, cache, churn := loc("main"), loc("leak"), loc("cache"), loc("churn")
	now := time.Now().UTC().Truncate(time.Second)
	for i := -3; i < 12; i++ { // i < 0: older than the 15 min window
		at := now.Add(time.Duration(i-11) * time.Minute)
		if i < 0 {
			at = at.Add(-10 * time.Minute)
		}
		n := max(i, 0)
		p := &pprofout.Profile{SampleRate: 1, Samples: []pprofout.Sample{
			{Stack: []*pprofout.Location{leak, mainLoc}, Size: 1 << 20, AllocCount: uint64(n + 1), InuseCount: uint64(n + 1), Labels: map[string]string{}},
			{Stack: []*pprofout.Location{cache, mainLoc}, Size: 4 << 20, AllocCount: 2, InuseCount: uint64(min(n+1, 2)), Labels: map[string]string{}},
			{Stack: []*pprofout.Location{churn, mainLoc}, Size: 1 << 20, AllocCount: uint64(100 * (n + 1)), InuseCount: 0, Labels: map[string]string{}},
		}}
		if i < 0 { // a different leak shape outside the window must not count
			p.Samples[0].InuseCount = 50
		}
		if err := pprofout.WriteFile(filepath.Join(cdir, at.Format("20060102T150405Z")+".pb.gz"), p); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(cdir, "20990101T000000Z.pb.gz"), []byte("garbage"), 0o644) // skipped, counted

	rec := httptest.NewRecorder()
	a.handler().ServeHTTP(rec, httptest.NewRequest("GET", "/profiles/growth?pod=web-0", nil))
	if rec.Code != 401 {
		t.Fatalf("without the token: status %d, want 401", rec.Code)
	}
	rec = httptest.NewRecorder()
	a.serveGrowth(rec, httptest.NewRequest("GET", "/profiles/growth?namespace=shop&pod=web-0&window=15m", nil))
	if rec.Code != 200 {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	var got []struct {
		Container string `json:"container"`
		Profiles  int    `json:"profiles"`
		Skipped   int    `json:"skipped"`
		Report    struct {
			Stacks []struct {
				Frames []string `json:"frames"`
				Growth struct {
					Trend string  `json:"trend"`
					Rate  float64 `json:"growth_bytes_per_min"`
				} `json:"growth"`
			} `json:"stacks"`
		} `json:"report"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Container != "app" || got[0].Profiles != 12 || got[0].Skipped != 1 {
		t.Fatalf("got %+v, want one container with 12 profiles in the window and 1 skipped", got)
	}
	trends := map[string]string{}
	for _, st := range got[0].Report.Stacks {
		fn := strings.Fields(st.Frames[0])[0]
		trends[fn] = st.Growth.Trend
		if fn == "leak" && math.Abs(st.Growth.Rate-(1<<20)) > 1 {
			t.Errorf("leak rate %.0f B/min, want %d", st.Growth.Rate, 1<<20)
		}
	}
	if trends["leak"] != "growing" || trends["cache"] != "steady" || trends["churn"] != "temporary" {
		t.Errorf("trends %v, want leak growing, cache steady, churn temporary", trends)
	}
	for _, bad := range []string{"/profiles/growth", "/profiles/growth?pod=web-0&window=-1h", "/profiles/growth?pod=web-0&window=1y"} {
		rec = httptest.NewRecorder()
		a.serveGrowth(rec, httptest.NewRequest("GET", bad, nil))
		if rec.Code != 400 {
			t.Errorf("%s: status %d, want 400", bad, rec.Code)
		}
	}
	rec = httptest.NewRecorder()
	a.serveGrowth(rec, httptest.NewRequest("GET", "/profiles/growth?pod=nope", nil))
	if rec.Code != 404 {
		t.Errorf("unknown pod: status %d, want 404", rec.Code)
	}
}
