// Package pyroscope pushes pprof profiles to a Pyroscope server through its
// HTTP ingest API: POST /ingest?name=<app>{k=v,...}&from=&until=&format=pprof
// with the profile in the multipart form field "profile" (and, for sample
// types Pyroscope does not know, their description in "sample_type_config").
package pyroscope

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Upload is one profile to push.
type Upload struct {
	App    string            // application name (Pyroscope's service_name)
	Labels map[string]string // namespace, pod, container, node, ...
	From   time.Time
	Until  time.Time
	Pprof  []byte // gzipped pprof protobuf
	// SampleTypes, when set, is sent as the multipart field
	// "sample_type_config" (JSON keyed by the pprof sample type): how
	// Pyroscope names, units and aggregates sample types it does not know.
	// nil: Pyroscope's defaults (Go's heap and CPU sample types).
	SampleTypes map[string]SampleType
}

// SampleType is one entry of Pyroscope's sample_type_config (the JSON keys
// of Pyroscope's tree.SampleTypeConfig).
type SampleType struct {
	Units       string `json:"units,omitempty"`        // "bytes", "objects", "samples"
	Aggregation string `json:"aggregation,omitempty"`  // "sum" or "average"
	DisplayName string `json:"display-name,omitempty"` // name shown instead of the sample type
	Cumulative  bool   `json:"cumulative,omitempty"`   // values grow over the process's life
}

// Pusher sends profiles to one server.
type Pusher struct {
	URL    string       // base URL, e.g. http://pyroscope:4040
	Client *http.Client // nil: a client with a 30s timeout
	// TenantID sets X-Scope-OrgID for multi-tenant servers.
	TenantID string
}

// sanitize makes a label value or app name safe inside name=app{k=v,...}:
// the characters that delimit the segment key are replaced.
func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case '{', '}', ',', '=', '\n', '"':
			return '_'
		}
		return r
	}, s)
}

// sanitizeKey keeps label names to [A-Za-z0-9_.].
func sanitizeKey(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '_' || r == '.' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9') {
			return r
		}
		return '_'
	}, s)
}

// Name returns the ingest name: app{k=v,...} with keys sorted; empty
// values are left out.
func Name(app string, labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	for k, v := range labels {
		if v != "" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(sanitize(app))
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(sanitizeKey(k))
		b.WriteByte('=')
		b.WriteString(sanitize(labels[k]))
	}
	b.WriteByte('}')
	return b.String()
}

// Push sends one profile.
func (p *Pusher) Push(ctx context.Context, u Upload) error {
	base, err := url.Parse(p.URL)
	if err != nil || base.Scheme == "" || base.Host == "" {
		return fmt.Errorf("bad Pyroscope URL %q: want http(s)://host:port", p.URL)
	}
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	fw, err := mw.CreateFormFile("profile", "profile.pprof")
	if err != nil {
		return err
	}
	if _, err := fw.Write(u.Pprof); err != nil {
		return err
	}
	if u.SampleTypes != nil {
		cfg, err := json.Marshal(u.SampleTypes)
		if err != nil {
			return err
		}
		fw, err := mw.CreateFormFile("sample_type_config", "sample_type_config.json")
		if err != nil {
			return err
		}
		if _, err := fw.Write(cfg); err != nil {
			return err
		}
	}
	if err := mw.Close(); err != nil {
		return err
	}
	q := url.Values{}
	q.Set("name", Name(u.App, u.Labels))
	q.Set("from", strconv.FormatInt(u.From.Unix(), 10))
	q.Set("until", strconv.FormatInt(u.Until.Unix(), 10))
	q.Set("format", "pprof")
	q.Set("spyName", "memprof")
	q.Set("units", "bytes")
	q.Set("aggregationType", "average")
	ing := base.JoinPath("ingest")
	ing.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, ing.String(), &body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("User-Agent", "memprof-agent")
	if p.TenantID != "" {
		req.Header.Set("X-Scope-OrgID", p.TenantID)
	}
	c := p.Client
	if c == nil {
		c = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("push to %s: %w", ing.Redacted(), err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("push to %s: %s: %s", ing.Redacted(), resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}
