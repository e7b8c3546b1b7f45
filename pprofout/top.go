package pprofout

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/google/pprof/profile"
)

// StackRow is one stack of a Top listing.
type StackRow struct {
	Value   int64    // sum of the sample type's values over the stack's samples
	Objects int64    // matching object count (inuse_objects for inuse_space, ...); 0 if the profile has none
	Frames  []string // leaf first: "func file:line", "func" or "0xaddr"; inlined frames innermost first
	Percent float64  // Value as a percentage of the sample type's total over all samples
}

// Top aggregates the samples of p by stack, ignoring labels and block size,
// for sampleType ("inuse_space", "alloc_space", "inuse_objects", ...), and
// returns the stacks sorted by descending value (ties by frames), at most n
// of them (all if n <= 0). Stacks whose value is zero are omitted.
func Top(p *profile.Profile, sampleType string, n int) ([]StackRow, error) {
	if p == nil {
		return nil, fmt.Errorf("pprofout: top %s: nil profile", sampleType)
	}
	vi := sampleIndex(p, sampleType)
	if vi < 0 {
		var have []string
		for _, st := range p.SampleType {
			have = append(have, st.Type)
		}
		return nil, fmt.Errorf("pprofout: top: profile has no sample type %q (it has %s)", sampleType, strings.Join(have, ", "))
	}
	oi := -1
	switch {
	case strings.HasSuffix(sampleType, "_objects"):
		oi = vi
	case strings.HasSuffix(sampleType, "_space"):
		oi = sampleIndex(p, strings.TrimSuffix(sampleType, "_space")+"_objects")
	}

	var total int64
	rows := make(map[string]*StackRow)
	for _, s := range p.Sample {
		if vi >= len(s.Value) {
			return nil, fmt.Errorf("pprofout: top %s: sample has %d values, want more than %d", sampleType, len(s.Value), vi)
		}
		v := s.Value[vi]
		total += v
		frames := stackFrames(s.Location)
		key := strings.Join(frames, "\x00")
		r, ok := rows[key]
		if !ok {
			r = &StackRow{Frames: frames}
			rows[key] = r
		}
		r.Value += v
		if oi >= 0 && oi < len(s.Value) {
			r.Objects += s.Value[oi]
		}
	}

	out := make([]StackRow, 0, len(rows))
	for _, r := range rows {
		if r.Value == 0 {
			continue
		}
		if total != 0 {
			r.Percent = 100 * float64(r.Value) / float64(total)
		}
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Value != out[j].Value {
			return out[i].Value > out[j].Value
		}
		return strings.Join(out[i].Frames, "\x00") < strings.Join(out[j].Frames, "\x00")
	})
	if n > 0 && len(out) > n {
		out = out[:n]
	}
	return out, nil
}

func sampleIndex(p *profile.Profile, sampleType string) int {
	for i, st := range p.SampleType {
		if st.Type == sampleType {
			return i
		}
	}
	return -1
}

// stackFrames renders a stack leaf first, expanding inlined lines.
func stackFrames(locs []*profile.Location) []string {
	var frames []string
	for _, loc := range locs {
		if loc == nil {
			continue
		}
		if len(loc.Line) == 0 {
			frames = append(frames, "0x"+strconv.FormatUint(loc.Address, 16))
			continue
		}
		for _, ln := range loc.Line {
			name, file := "??", ""
			if ln.Function != nil {
				if ln.Function.Name != "" {
					name = ln.Function.Name
				} else if ln.Function.SystemName != "" {
					name = ln.Function.SystemName
				}
				file = ln.Function.Filename
			}
			switch {
			case file != "" && ln.Line > 0:
				frames = append(frames, fmt.Sprintf("%s %s:%d", name, file, ln.Line))
			case file != "":
				frames = append(frames, name+" "+file)
			default:
				frames = append(frames, name)
			}
		}
	}
	return frames
}

// FormatTop writes rows as a table: rank, value (KiB/MiB/... for byte sample
// types), percent and objects, each followed by up to maxFrames frames of the
// stack, leaf first, indented (all frames if maxFrames <= 0), with the
// characters a terminal would act on escaped (Printable).
func FormatTop(w io.Writer, rows []StackRow, sampleType string, maxFrames int) error {
	isBytes := strings.HasSuffix(sampleType, "_space") || strings.HasSuffix(sampleType, "bytes")
	var sb strings.Builder
	width := max(12, len(sampleType))
	fmt.Fprintf(&sb, "%4s  %*s  %7s  %10s  %s\n", "rank", width, sampleType, "percent", "objects", "stack (leaf first)")
	for i, r := range rows {
		val := strconv.FormatInt(r.Value, 10)
		if isBytes {
			val = HumanBytes(r.Value)
		}
		fmt.Fprintf(&sb, "%4d  %*s  %6.2f%%  %10d\n", i+1, width, val, r.Percent, r.Objects)
		frames := r.Frames
		more := 0
		if maxFrames > 0 && len(frames) > maxFrames {
			more = len(frames) - maxFrames
			frames = frames[:maxFrames]
		}
		for _, f := range frames {
			fmt.Fprintf(&sb, "        %s\n", Printable(f))
		}
		switch {
		case more == 1:
			sb.WriteString("        ... 1 more frame\n")
		case more > 1:
			fmt.Fprintf(&sb, "        ... %d more frames\n", more)
		}
		if len(r.Frames) == 0 {
			fmt.Fprintf(&sb, "        (no stack)\n")
		}
	}
	if _, err := io.WriteString(w, sb.String()); err != nil {
		return fmt.Errorf("pprofout: write top table: %w", err)
	}
	return nil
}

// HumanBytes formats n bytes with binary units: "512 B", "1.5 KiB",
// "12.3 MiB", "2.0 GiB". Negative values keep their sign.
func HumanBytes(n int64) string {
	sign := ""
	u := uint64(n)
	if n < 0 {
		sign = "-"
		u = uint64(-(n + 1)) + 1
	}
	if u < 1024 {
		return fmt.Sprintf("%s%d B", sign, u)
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	f := float64(u) / 1024
	i := 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	s := strconv.FormatFloat(f, 'f', 1, 64)
	if s == "1024.0" && i < len(units)-1 {
		s = "1.0"
		i++
	}
	return sign + s + " " + units[i]
}
