package report

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/template"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/pprofout"
)

// The flame-graph and chart libraries, bundled from npm (assets/VERSIONS,
// licences next to them; `make report-assets` refreshes them): the report
// needs no network when it is viewed.
var (
	//go:embed assets/d3.min.js
	d3JS string
	//go:embed assets/d3-flamegraph.umd.min.js
	flameJS string
	//go:embed assets/d3-flamegraph.css
	flameCSS string
	//go:embed report.html
	pageHTML string
	//go:embed report.js
	pageJS string
)

var page = template.Must(template.New("report").Delims("[[", "]]").Parse(pageHTML))

// Flame is one node of a flame graph (the input format of d3-flame-graph):
// Value is the node's total, its children included.
type Flame struct {
	Name     string   `json:"name"`
	Value    int64    `json:"value"`
	Children []*Flame `json:"children,omitempty"`
}

// MaxFlameNodes bounds the nodes of one flame graph; the stacks of the
// smallest samples are cut short past it (their value stays in the parent).
const MaxFlameNodes = 50000

// FlameGraphs builds one flame graph per sample type of p, root first
// (outermost frame at the bottom), frames as pprofout.StackFrames renders
// them.
func FlameGraphs(p *profile.Profile) map[string]*Flame {
	out := map[string]*Flame{}
	type sm struct {
		frames []string
		vals   []int64
	}
	var samples []sm
	for _, s := range p.Sample {
		samples = append(samples, sm{pprofout.StackFrames(s.Location), s.Value})
	}
	for vi, st := range p.SampleType {
		root := &Flame{Name: "all"}
		index := map[*Flame]map[string]*Flame{}
		nodes := 1
		for _, s := range samples {
			if vi >= len(s.vals) || s.vals[vi] == 0 {
				continue
			}
			v := s.vals[vi]
			n := root
			n.Value += v
			for i := len(s.frames) - 1; i >= 0; i-- {
				kids := index[n]
				if kids == nil {
					kids = map[string]*Flame{}
					index[n] = kids
				}
				c := kids[s.frames[i]]
				if c == nil {
					if nodes >= MaxFlameNodes {
						break
					}
					c = &Flame{Name: s.frames[i]}
					kids[s.frames[i]] = c
					n.Children = append(n.Children, c)
					nodes++
				}
				c.Value += v
				n = c
			}
		}
		out[st.Type] = root
	}
	return out
}

// WriteHTML writes r as one self-contained HTML page: a flame graph of each
// sample type (switchable), the timeline (total live bytes, RSS and
// RssAnon of each process, cgroup usage, the top stacks) with a window to
// select, the growth table, the fragmentation figures and, for an OOM
// post-mortem, the kill. Everything a target named (function and file
// names) is JSON-encoded in the page and shown as text, never as markup.
func WriteHTML(w io.Writer, r *Report) error {
	if r.profile == nil {
		return fmt.Errorf("report: HTML needs a report made by Analyze or Load")
	}
	types := []string{}
	def := r.profile.DefaultSampleType
	for _, st := range r.profile.SampleType {
		types = append(types, st.Type)
	}
	if def == "" && len(types) > 0 {
		def = types[len(types)-1]
	}
	data, err := json.Marshal(map[string]any{
		"report":      r,
		"flame":       FlameGraphs(r.profile),
		"sampleTypes": types,
		"defaultType": def,
	})
	if err != nil {
		return fmt.Errorf("report: encode the page's data: %w", err)
	}
	// json.Marshal escapes <, > and & inside strings, so the data cannot
	// close the <script> element it sits in.
	title := "memprof report"
	if r.Profile != "" {
		title += ": " + r.Profile
	}
	return page.Execute(w, map[string]string{
		"Title":    template.HTMLEscapeString(title),
		"D3":       noScriptEnd(d3JS),
		"Flame":    noScriptEnd(flameJS),
		"FlameCSS": flameCSS,
		"Page":     noScriptEnd(pageJS),
		"Data":     string(data),
	})
}

// noScriptEnd keeps bundled code from ending its <script> element early.
func noScriptEnd(js string) string { return strings.ReplaceAll(js, "</script", `<\/script`) }
