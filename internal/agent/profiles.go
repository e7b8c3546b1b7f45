package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/google/pprof/profile"

	"github.com/memprof/memprof/internal/agent/pyroscope"
	"github.com/memprof/memprof/pprofout"
)

// heapProfile builds the current heap profile of containers, labelled with
// namespace, pod, container and node: their processes as they are now, and
// the ones that exited since the container's last saved profile as they
// were at their exit. marks, if not nil, gets per container the exit mark
// to release those exited processes with once the profile is kept.
func (a *Agent) heapProfile(conts []*container, marks map[*container]uint64) (*profile.Profile, error) {
	var all *pprofout.Profile
	for _, c := range conts {
		p, mark, err := a.s.ProfileOfCgroups(c.dir)
		if err != nil {
			return nil, err
		}
		if marks != nil {
			marks[c] = mark
		}
		for i := range p.Samples {
			smp := &p.Samples[i]
			smp.Labels["namespace"] = c.labels.Namespace
			smp.Labels["pod"] = c.labels.Pod
			smp.Labels["container"] = c.labels.Container
			smp.Labels["node"] = a.cfg.NodeName
		}
		if all == nil {
			all = p
		} else {
			all.Samples = append(all.Samples, p.Samples...)
		}
	}
	if all == nil {
		var err error
		if all, _, err = a.s.ProfileOfCgroups(); err != nil {
			return nil, err
		}
	}
	return pprofout.Build(all)
}

// allocProfile is the profile of what was allocated during d: the
// difference of two heap profiles taken d apart (alloc values are the
// window's allocations, inuse values the change of live memory).
func (a *Agent) allocProfile(ctx context.Context, conts []*container, d time.Duration) (*profile.Profile, error) {
	p0, err := a.heapProfile(conts, nil)
	if err != nil {
		return nil, err
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.C:
	}
	p1, err := a.heapProfile(conts, nil)
	if err != nil {
		return nil, err
	}
	return diffProfiles(p0, p1, d)
}

// diffProfiles returns p1 - p0, keeping the samples that allocated in the
// window.
func diffProfiles(p0, p1 *profile.Profile, d time.Duration) (*profile.Profile, error) {
	p0 = p0.Copy()
	p0.Scale(-1)
	m, err := profile.Merge([]*profile.Profile{p1, p0})
	if err != nil {
		return nil, fmt.Errorf("difference of two heap profiles: %w", err)
	}
	idx := -1
	for i, st := range m.SampleType {
		if st.Type == "alloc_objects" {
			idx = i
		}
	}
	kept := m.Sample[:0]
	for _, s := range m.Sample {
		if idx >= 0 && s.Value[idx] > 0 {
			kept = append(kept, s)
		}
	}
	m.Sample = kept
	m.TimeNanos = p1.TimeNanos - d.Nanoseconds()
	m.DurationNanos = d.Nanoseconds()
	m = m.Compact()
	return m, nil
}

var unsafeName = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// containerDir is where a container's periodic profiles go.
func (a *Agent) containerDir(c *container) string {
	name := c.labels.Namespace + "_" + c.labels.Pod + "_" + c.labels.Container
	return filepath.Join(a.cfg.DataDir, "profiles", unsafeName.ReplaceAllString(name, "-"))
}

// saveProfiles writes each profiled container's heap profile to disk,
// pushes it to Pyroscope when configured, and applies the retention.
func (a *Agent) saveProfiles(ctx context.Context) {
	now := time.Now()
	from := now.Add(-a.cfg.ProfileInterval)
	for _, c := range a.profiledList() {
		if ctx.Err() != nil {
			return
		}
		marks := map[*container]uint64{}
		p, err := a.heapProfile([]*container{c}, marks)
		if err != nil {
			a.cfg.Log.Error("heap profile", c.labels.logAttrs("err", err)...)
			continue
		}
		if len(p.Sample) == 0 {
			a.s.ReleaseExited(c.dir, marks[c])
			continue
		}
		var buf bytes.Buffer
		if err := p.Write(&buf); err != nil {
			continue
		}
		dir := a.containerDir(c)
		if err := os.MkdirAll(dir, 0o755); err == nil {
			// One file per save: a save in the same second as the last
			// (the loop also saves RSS profiles and may fall behind) takes
			// the next second's name rather than overwrite a profile
			// holding processes that exited (released once saved).
			name := now.UTC()
			path := filepath.Join(dir, name.Format("20060102T150405Z")+".pb.gz")
			for i := 0; i < 10; i++ {
				if _, err := os.Stat(path); err != nil {
					break
				}
				name = name.Add(time.Second)
				path = filepath.Join(dir, name.Format("20060102T150405Z")+".pb.gz")
			}
			if err := writeAtomic(path, buf.Bytes()); err != nil {
				a.cfg.Log.Error("keep heap profile", c.labels.logAttrs("path", path, "err", err)...)
			} else {
				// The processes that exited are in this profile: the
				// next one holds only the ones that exit after.
				a.s.ReleaseExited(c.dir, marks[c])
				a.mu.Lock()
				a.saved++
				a.mu.Unlock()
			}
		}
		if a.cfg.PyroscopeURL != "" {
			a.push(ctx, c.labels, from, now, buf.Bytes(), nil)
		}
	}
	a.applyRetention(now)
}

// push sends one gzipped pprof of the container l to Pyroscope; types
// describes sample types Pyroscope does not know (nil for heap profiles).
func (a *Agent) push(ctx context.Context, l labelSet, from, until time.Time, data []byte, types map[string]pyroscope.SampleType) {
	service := l.Namespace + "/" + l.Container
	labels := map[string]string{
		"service_name": service,
		"namespace":    l.Namespace,
		"pod":          l.Pod,
		"container":    l.Container,
		"node":         a.cfg.NodeName,
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	pu := &pyroscope.Pusher{URL: a.cfg.PyroscopeURL}
	err := pu.Push(pctx, pyroscope.Upload{App: service, Labels: labels, From: from, Until: until, Pprof: data, SampleTypes: types})
	a.mu.Lock()
	if err != nil {
		a.pushErrs++
	} else {
		a.pushes++
	}
	a.mu.Unlock()
	if err != nil {
		a.cfg.Log.Warn("push profile to Pyroscope", l.logAttrs("err", err)...)
	}
}

// applyRetention deletes periodic profiles older than the retention, and
// empty container directories.
func (a *Agent) applyRetention(now time.Time) {
	root := filepath.Join(a.cfg.DataDir, "profiles")
	dirs, _ := os.ReadDir(root)
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		dir := filepath.Join(root, d.Name())
		files, _ := os.ReadDir(dir)
		left := 0
		for _, f := range files {
			info, err := f.Info()
			if err != nil {
				continue
			}
			if now.Sub(info.ModTime()) > a.cfg.Retention {
				os.Remove(filepath.Join(dir, f.Name()))
				continue
			}
			left++
		}
		if left == 0 {
			os.Remove(dir)
		}
	}
}

func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// StoredProfiles lists the periodic profile files of a container directory
// name (for tests and listing), oldest first.
func (a *Agent) StoredProfiles() ([]string, error) {
	var out []string
	err := filepath.WalkDir(filepath.Join(a.cfg.DataDir, "profiles"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".pb.gz") {
			out = append(out, p)
		}
		return nil
	})
	return out, err
}
