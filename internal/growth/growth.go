// Package growth classifies how the live bytes of one allocation stack
// evolve over a recording: growing (a leak suspect), steady (a cache or pool
// that plateaued), temporary (allocated and freed) or shrinking, with a
// growth rate and a stated confidence. It is pure: it sees a time series and
// two totals, nothing else.
//
// Method (Classify):
//
//  1. Temporary: the stack allocated bytes in the window (alloc_space > 0)
//     but its live bytes never exceeded TemporaryFraction (10%) of them at
//     any sampled instant: at least 90% of what it allocated was freed.
//  2. The trend is judged on the late part of the window only (the last
//     LateFraction = 50% of its time span): the question is "is it still
//     rising now?". A cache that fills at start-up and then plateaus is flat
//     there; a leak that rises throughout still rises there. This is the
//     plateau test.
//  3. On the late part: the Mann–Kendall trend test (Mann 1945, Kendall
//     1975; variance corrected for ties, which the step-shaped series of a
//     sampled heap has many of) gives the significance, and the Theil–Sen
//     estimator (Sen 1968: the median of the pairwise slopes, robust to
//     outliers and steps) the rate. A trend counts when it is significant
//     at the two-sided 5% level (|Z| >= 1.96) and the rise it predicts over
//     the late part exceeds three standard deviations of the sampling noise
//     and two quanta: max(2q, 3*sqrt((|rise|+turnover)*q)) bytes, where q
//     is the sampling quantum (the sample rate in bytes, 1 at rate 1) and
//     turnover the bytes allocated and freed in the late part (alloc_space
//     minus the final live bytes, times LateFraction: spread evenly).
//     Under Poisson byte sampling at rate q, B bytes allocated are seen as
//     about B/q samples of q bytes each, so their estimate has a standard
//     deviation of about sqrt(B*q); the blocks a churning cache replaces
//     are drawn again, so its estimate random-walks by about
//     sqrt(turnover*q). At the default rate a rise must so be about 9
//     sampled blocks (4.5 MiB at 512 KiB) before it is called a trend: a
//     1 MiB/min leak needs a late half of some 5 minutes; at rate 1 a few
//     bytes suffice.
//  4. Confidence: with fewer than MinPoints points in the late part there
//     is no verdict (Unknown). Growing or shrinking is "high" when
//     p < 0.001 with at least 10 late points, "medium" when p < 0.01, "low"
//     otherwise; steady is "medium" with at least 10 late points, "low"
//     otherwise. A window shorter than ShortWindow (60 s) caps confidence
//     at "medium" and says why: a warm-up or a cache still filling looks
//     the same as a leak over a short window.
//
// Known limit: Mann–Kendall assumes independent points; a series that
// random-walks (a churning cache whose sampled blocks are replaced) is
// autocorrelated, which the turnover term of step 3 guards against.
package growth

import (
	"fmt"
	"math"
	"slices"
)

// Trend is the class of a stack's live bytes over the window.
type Trend string

// The trends Classify returns.
const (
	Growing   Trend = "growing"   // live bytes rising through the late window: a leak suspect
	Steady    Trend = "steady"    // no significant trend in the late window: a cache, a pool, a plateau
	Temporary Trend = "temporary" // allocated and freed: live bytes never above 10% of alloc_space
	Shrinking Trend = "shrinking" // live bytes falling through the late window
	Unknown   Trend = "unknown"   // too few points to say
)

// Confidence grades a verdict.
type Confidence string

// Confidence levels, best first.
const (
	High   Confidence = "high"
	Medium Confidence = "medium"
	Low    Confidence = "low"
	None   Confidence = "none"
)

// Thresholds of the method (see the package comment for why).
const (
	LateFraction      = 0.5  // the late part is the last half of the window's time span
	MinPoints         = 5    // fewer late points: Unknown
	ZSignificant      = 1.96 // two-sided 5% level of Mann–Kendall
	TemporaryFraction = 0.10 // live never above 10% of alloc_space: temporary
	ShortWindow       = 60.0 // seconds; shorter windows cap confidence at medium
)

// Input is one stack's series.
type Input struct {
	Times []float64 // seconds since any origin, increasing
	Live  []float64 // live bytes at Times (same length)
	// AllocBytes is the bytes allocated under the stack during the window
	// (alloc_space); 0 if unknown.
	AllocBytes float64
	// Quantum is the sampling quantum in bytes: the sample rate (1 when
	// every allocation is recorded). Values below 1 count as 1.
	Quantum float64
}

// Verdict is the classification of one stack.
type Verdict struct {
	Trend      Trend      `json:"trend"`
	Confidence Confidence `json:"confidence"`
	// RatePerMin is the Theil–Sen slope of live bytes over the late part of
	// the window, in bytes per minute (0 for temporary and unknown).
	RatePerMin float64 `json:"growth_bytes_per_min"`
	// Z and P are the Mann–Kendall statistic and two-sided p-value over the
	// late part (0 and 1 when not computed).
	Z float64 `json:"mann_kendall_z"`
	P float64 `json:"p_value"`
	// LatePoints is the number of points in the late part; LateFrom its
	// start (same unit and origin as Input.Times).
	LatePoints int     `json:"late_points"`
	LateFrom   float64 `json:"late_from_s"`
	// Window is the series' time span in seconds.
	Window float64 `json:"window_s"`
	// Reasons explain the trend and anything that lowered the confidence.
	Reasons []string `json:"reasons,omitempty"`
}

// Classify applies the method of the package comment to in. It never
// panics: mismatched or empty series give Unknown with a reason.
func Classify(in Input) Verdict {
	v := Verdict{Trend: Unknown, Confidence: None, P: 1}
	q := math.Max(in.Quantum, 1)
	n := len(in.Times)
	if n != len(in.Live) {
		v.Reasons = append(v.Reasons, fmt.Sprintf("series of %d times and %d values", n, len(in.Live)))
		return v
	}
	if n > 0 {
		v.Window = in.Times[n-1] - in.Times[0]
	}
	peak := 0.0
	for _, x := range in.Live {
		peak = math.Max(peak, x)
	}
	if in.AllocBytes > 0 && peak <= TemporaryFraction*in.AllocBytes {
		v.Trend = Temporary
		v.Reasons = append(v.Reasons, fmt.Sprintf("live bytes never above %.0f%% of the %s allocated", 100*peak/in.AllocBytes, human(in.AllocBytes)))
		// Sampled allocations seen: about AllocBytes/q.
		switch {
		case n == 0 || in.AllocBytes < 20*q:
			v.Confidence = Low
			v.Reasons = append(v.Reasons, "few sampled allocations")
		case n < MinPoints:
			v.Confidence = Low
			v.Reasons = append(v.Reasons, fmt.Sprintf("only %d points in the series", n))
		default:
			v.Confidence = High
		}
		return capShort(v)
	}
	cut := 0
	if n > 0 {
		from := in.Times[0] + (1-LateFraction)*v.Window
		for cut < n && in.Times[cut] < from {
			cut++
		}
	}
	t, x := in.Times[cut:], in.Live[cut:]
	v.LatePoints = len(t)
	if len(t) > 0 {
		v.LateFrom = t[0]
	}
	if len(t) < MinPoints {
		v.Reasons = append(v.Reasons, fmt.Sprintf("too few samples: %d points in the last half of the window, need %d (record longer)", len(t), MinPoints))
		return v
	}
	slope := TheilSen(t, x)
	v.RatePerMin = slope * 60
	v.Z, v.P = MannKendall(x)
	span := t[len(t)-1] - t[0]
	rise := slope * span
	turnover := math.Max(in.AllocBytes-in.Live[n-1], 0) * LateFraction
	noise := math.Max(2*q, 3*math.Sqrt((math.Abs(rise)+turnover)*q))
	switch {
	case v.Z >= ZSignificant && slope > 0 && rise >= noise:
		v.Trend = Growing
		v.Reasons = append(v.Reasons, fmt.Sprintf("rising through the last %.0f s (Mann–Kendall p=%.2g, +%s over it)", span, v.P, human(rise)))
	case v.Z <= -ZSignificant && slope < 0 && -rise >= noise:
		v.Trend = Shrinking
		v.Reasons = append(v.Reasons, fmt.Sprintf("falling through the last %.0f s (Mann–Kendall p=%.2g, %s over it)", span, v.P, human(rise)))
	default:
		v.Trend = Steady
		switch {
		case math.Abs(v.Z) >= ZSignificant:
			v.Reasons = append(v.Reasons, fmt.Sprintf("a trend of %s over the last %.0f s, within the sampling noise (%s)", human(rise), span, human(noise)))
		default:
			v.Reasons = append(v.Reasons, fmt.Sprintf("no significant trend in the last %.0f s (Mann–Kendall p=%.2g)", span, v.P))
		}
	}
	switch {
	case v.Trend == Steady && len(t) >= 10:
		v.Confidence = Medium
	case v.Trend == Steady:
		v.Confidence = Low
		v.Reasons = append(v.Reasons, fmt.Sprintf("only %d points in the last half of the window", len(t)))
	case v.P < 0.001 && len(t) >= 10:
		v.Confidence = High
	case v.P < 0.01:
		v.Confidence = Medium
	default:
		v.Confidence = Low
	}
	return capShort(v)
}

func capShort(v Verdict) Verdict {
	if v.Window < ShortWindow && v.Confidence == High {
		v.Confidence = Medium
	}
	if v.Window < ShortWindow && v.Trend != Temporary {
		v.Reasons = append(v.Reasons, fmt.Sprintf("short window (%.0f s): a warm-up or a cache still filling looks the same as a leak; record longer", v.Window))
	}
	return v
}

// TheilSen returns the Theil–Sen slope of (t, x): the median of the slopes
// of all pairs of points with distinct t, in x units per t unit; 0 for
// fewer than two distinct times. O(n² log n): callers keep n to a few
// hundred points.
func TheilSen(t, x []float64) float64 {
	n := min(len(t), len(x))
	slopes := make([]float64, 0, n*(n-1)/2)
	for i := 0; i < n; i++ {
		for j := i + 1; j < n; j++ {
			if dt := t[j] - t[i]; dt != 0 {
				slopes = append(slopes, (x[j]-x[i])/dt)
			}
		}
	}
	if len(slopes) == 0 {
		return 0
	}
	return median(slopes)
}

// MannKendall returns the Mann–Kendall statistic Z (normal approximation
// with continuity correction, tie-corrected variance) of x in order, and
// its two-sided p-value. Z > 0 means an upward trend. Fewer than 3 points,
// or a constant series, give (0, 1).
func MannKendall(x []float64) (z, p float64) {
	n := len(x)
	if n < 3 {
		return 0, 1
	}
	s := 0
	for i := 0; i < n; i++ {
		for j := i + 1; j < n; j++ {
			switch {
			case x[j] > x[i]:
				s++
			case x[j] < x[i]:
				s--
			}
		}
	}
	sorted := append([]float64(nil), x...)
	slices.Sort(sorted)
	nf := float64(n)
	variance := nf * (nf - 1) * (2*nf + 5)
	for i := 0; i < n; {
		j := i
		for j < n && sorted[j] == sorted[i] {
			j++
		}
		if tt := float64(j - i); tt > 1 {
			variance -= tt * (tt - 1) * (2*tt + 5)
		}
		i = j
	}
	variance /= 18
	if variance <= 0 {
		return 0, 1
	}
	switch {
	case s > 0:
		z = float64(s-1) / math.Sqrt(variance)
	case s < 0:
		z = float64(s+1) / math.Sqrt(variance)
	}
	return z, math.Erfc(math.Abs(z) / math.Sqrt2)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	m := len(v) / 2
	if len(v)%2 == 1 {
		return v[m]
	}
	return (v[m-1] + v[m]) / 2
}

func human(b float64) string {
	a := math.Abs(b)
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	i := 0
	for a >= 1024 && i < len(units)-1 {
		a /= 1024
		i++
	}
	if b < 0 {
		a = -a
	}
	if i == 0 {
		return fmt.Sprintf("%.0f B", a)
	}
	return fmt.Sprintf("%.1f %s", a, units[i])
}
