package growth

import (
	"math"
	"math/rand"
	"testing"
)

// sampled simulates memprof's Poisson byte sampling of a stack whose true
// live block count at time i is blocks(i) blocks of size bytes, at rate
// bytes: each block is sampled once at its allocation with probability
// 1-exp(-size/rate) and the estimate is unsampled as pprofout does.
// Freed blocks are the oldest ones.
func sampled(rng *rand.Rand, n int, dt float64, size, rate float64, blocks func(i int) int) (t, live []float64) {
	p := 1 - math.Exp(-size/rate)
	scale := size / p
	var flags []bool // sampled flag of each live block, oldest first
	for i := 0; i < n; i++ {
		want := blocks(i)
		for len(flags) < want {
			flags = append(flags, rng.Float64() < p)
		}
		if len(flags) > want {
			flags = flags[len(flags)-want:]
		}
		c := 0
		for _, f := range flags {
			if f {
				c++
			}
		}
		t = append(t, float64(i)*dt)
		live = append(live, float64(c)*scale)
	}
	return t, live
}

func TestMannKendallKnownValues(t *testing.T) {
	x := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	z, p := MannKendall(x)
	// S = 45, Var = 10*9*25/18 = 125, Z = 44/sqrt(125).
	if want := 44 / math.Sqrt(125); math.Abs(z-want) > 1e-12 {
		t.Fatalf("Z = %v, want %v", z, want)
	}
	if p > 1e-4 {
		t.Fatalf("p = %v for a strictly increasing series", p)
	}
	// Ties: 1,1,2,2,3 -> S = 8; Var = (5*4*15 - 2*(2*1*9))/18 = 264/18.
	z, _ = MannKendall([]float64{1, 1, 2, 2, 3})
	if want := 7 / math.Sqrt(264.0/18); math.Abs(z-want) > 1e-12 {
		t.Fatalf("tied Z = %v, want %v", z, want)
	}
	if z, p := MannKendall([]float64{4, 4, 4, 4}); z != 0 || p != 1 {
		t.Fatalf("constant series: Z=%v p=%v", z, p)
	}
}

func TestTheilSenIgnoresOutliers(t *testing.T) {
	ts := []float64{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
	x := make([]float64, len(ts))
	for i := range ts {
		x[i] = 3*ts[i] + 10
	}
	x[4] = 1e9 // one wild point
	if s := TheilSen(ts, x); math.Abs(s-3) > 1e-9 {
		t.Fatalf("slope %v, want 3", s)
	}
	if s := TheilSen([]float64{1, 1}, []float64{0, 5}); s != 0 {
		t.Fatalf("no distinct times: slope %v", s)
	}
}

// The three shapes of the issue, sampled at the default rate (512 KiB) and at
// rate 1, over 40 points (10 s at 250 ms), for many seeds.
func TestClassifyShapes(t *testing.T) {
	const n, dt = 40, 0.25
	for _, rate := range []float64{1, 512 << 10} {
		bad := map[string]int{}
		for seed := int64(0); seed < 200; seed++ {
			rng := rand.New(rand.NewSource(seed))
			// Leak: 64 KiB blocks, 64 per second (4 MiB/s).
			tl, ll := sampled(rng, n, dt, 64<<10, rate, func(i int) int { return 16 * (i + 1) })
			v := Classify(Input{Times: tl, Live: ll, AllocBytes: ll[n-1], Quantum: rate})
			// Tolerance of the rate: 4 standard deviations of a Poisson
			// count of the samples expected in the late half (exact at
			// rate 1).
			expected := 20 << 20 / (64 << 10) * (1 - math.Exp(-float64(64<<10)/rate))
			tol := 4 / math.Sqrt(expected)
			if rate == 1 {
				tol = 0.01
			}
			if v.Trend != Growing || v.Confidence == Low {
				bad["leak"]++
			} else if got := v.RatePerMin / (240 << 20); math.Abs(got-1) > tol {
				// Theil–Sen over a staircase is noisier than the count
				// itself: counted with the misclassifications.
				bad["leak rate"]++
				t.Logf("rate %v seed %d: leak rate %.0f B/min, true %d (tolerance %.0f%%)", rate, seed, v.RatePerMin, 240<<20, 100*tol)
			}
			// Cache: 4 KiB blocks, 32 MiB filled in the first 2 s, then kept.
			tc, lc := sampled(rng, n, dt, 4<<10, rate, func(i int) int { return min(8192, 1024*(i+1)) })
			if v := Classify(Input{Times: tc, Live: lc, AllocBytes: 32 << 20, Quantum: rate}); v.Trend != Steady {
				bad["cache"]++
			}
			// Churn: 4 KiB blocks, 0-2 live at any instant, 40 MB allocated.
			tch, lch := sampled(rng, n, dt, 4<<10, rate, func(i int) int { return rng.Intn(3) })
			if v := Classify(Input{Times: tch, Live: lch, AllocBytes: 40e6, Quantum: rate}); v.Trend != Temporary {
				bad["churn"]++
			}
			// Freed: a 64 MiB table released in 64 KiB blocks over the window.
			ts, ls := sampled(rng, n, dt, 64<<10, rate, func(i int) int { return 1024 - 25*i })
			if v := Classify(Input{Times: ts, Live: ls, AllocBytes: 64 << 20, Quantum: rate}); v.Trend != Shrinking {
				bad["shrink"]++
			}
		}
		// At rate 1 every classification must be right; sampled, allow 1%.
		limit := 0
		if rate > 1 {
			limit = 2
		}
		for k, c := range bad {
			if c > limit {
				t.Errorf("rate %v: %s misclassified in %d of 200 runs (allowed %d)", rate, k, c, limit)
			}
		}
	}
}

func TestClassifyPlateauAfterLongFill(t *testing.T) {
	// A cache filling for 40% of the window, then flat: steady (the late
	// half is flat), where a whole-window regression would call it growing.
	var ts, x []float64
	for i := 0; i < 50; i++ {
		ts = append(ts, float64(i))
		x = append(x, float64(min(i, 20))*1e6)
	}
	if v := Classify(Input{Times: ts, Live: x, AllocBytes: 20e6, Quantum: 1}); v.Trend != Steady {
		t.Fatalf("plateau: %+v", v)
	}
}

func TestClassifyConfidence(t *testing.T) {
	line := func(n int, dt float64) (ts, x []float64) {
		for i := 0; i < n; i++ {
			ts = append(ts, float64(i)*dt)
			x = append(x, float64(i)*1e6)
		}
		return
	}
	ts, x := line(4, 1)
	v := Classify(Input{Times: ts, Live: x, AllocBytes: x[3], Quantum: 1})
	if v.Trend != Unknown || v.Confidence != None || len(v.Reasons) == 0 {
		t.Fatalf("4 points: %+v", v)
	}
	ts, x = line(40, 0.25) // 10 s window: at most medium, and says why
	v = Classify(Input{Times: ts, Live: x, AllocBytes: x[39], Quantum: 1})
	if v.Trend != Growing || v.Confidence != Medium {
		t.Fatalf("short window: %+v", v)
	}
	if last := v.Reasons[len(v.Reasons)-1]; last[:12] != "short window" {
		t.Fatalf("short window not stated: %q", v.Reasons)
	}
	ts, x = line(100, 3) // 5 min
	if v := Classify(Input{Times: ts, Live: x, AllocBytes: x[99], Quantum: 1}); v.Trend != Growing || v.Confidence != High {
		t.Fatalf("long window: %+v", v)
	}
	if v := Classify(Input{Times: ts[:3], Live: x[:4]}); v.Trend != Unknown {
		t.Fatalf("mismatched series: %+v", v)
	}
	if v := Classify(Input{}); v.Trend != Unknown {
		t.Fatalf("empty: %+v", v)
	}
}

func TestClassifySamplingNoiseIsNotATrend(t *testing.T) {
	// A 256 MiB steady cache whose 64 KiB entries are replaced 5% per step:
	// the sampled estimate random-walks. Not a leak.
	wrong := 0
	for seed := int64(0); seed < 100; seed++ {
		rng := rand.New(rand.NewSource(seed))
		rate := float64(512 << 10)
		p := 1 - math.Exp(-float64(64<<10)/rate)
		flags := make([]bool, 4096)
		for i := range flags {
			flags[i] = rng.Float64() < p
		}
		var ts, x []float64
		for i := 0; i < 60; i++ {
			for k := 0; k < 200; k++ {
				flags[rng.Intn(len(flags))] = rng.Float64() < p
			}
			c := 0
			for _, f := range flags {
				if f {
					c++
				}
			}
			ts = append(ts, float64(i))
			x = append(x, float64(c)*float64(64<<10)/p)
		}
		if v := Classify(Input{Times: ts, Live: x, AllocBytes: 600 << 20, Quantum: rate}); v.Trend == Growing && v.Confidence != Low {
			wrong++
		}
	}
	if wrong > 5 {
		t.Fatalf("a steady churning cache was called growing (medium or high) in %d of 100 runs", wrong)
	}
}

// BenchmarkClassify: one stack with a full series (256 points, 128 in the
// late half), the worst case of a report.
func BenchmarkClassify(b *testing.B) {
	rng := rand.New(rand.NewSource(1))
	ts, x := make([]float64, 256), make([]float64, 256)
	for i := range ts {
		ts[i] = float64(i)
		x[i] = float64(i)*1e5 + rng.Float64()*1e6
	}
	for i := 0; i < b.N; i++ {
		Classify(Input{Times: ts, Live: x, AllocBytes: x[255], Quantum: 512 << 10})
	}
}
