package agent

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
)

// The agent logs structured records (log/slog) with the attributes of what
// they are about: pid, comm, namespace, pod, container, cgroup. Records
// carry what targets control (comm, pod and container names from files,
// paths, ELF names): a comm of "x\nlevel=ERROR msg=forged" must not forge a
// record, nor an ESC sequence rewrite a terminal. slog's handlers see to
// it: the text handler quotes (strconv.Quote) every value and message
// holding a space, '=', '"', a control character or invalid UTF-8; the
// JSON handler escapes control characters (\n, \u001b) and U+2028/2029.
// TestLogEscapes checks both.

// Log formats of NewLogger.
const (
	LogText = "text" // key=value per line (slog.TextHandler)
	LogJSON = "json" // one JSON object per line (slog.JSONHandler)
)

// NewLogger returns a logger writing records to w in format LogText or
// LogJSON, at level Info and above; an unknown format is an error naming
// the known ones.
func NewLogger(w io.Writer, format string) (*slog.Logger, error) {
	switch format {
	case LogText, "":
		return slog.New(slog.NewTextHandler(w, nil)), nil
	case LogJSON:
		return slog.New(slog.NewJSONHandler(w, nil)), nil
	}
	return nil, fmt.Errorf("unknown log format %q: use %q or %q", format, LogText, LogJSON)
}

// logfLogger returns a logger whose records go to logf, one call per
// record, as the text handler writes them without the time (the caller's
// lines have their own, as testing.T.Logf).
func logfLogger(logf func(format string, args ...any)) *slog.Logger {
	return slog.New(slog.NewTextHandler(logfWriter(logf), &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
}

// logfWriter adapts a printf-style function to the io.Writer of a slog
// handler, which writes each record with one Write.
type logfWriter func(format string, args ...any)

func (w logfWriter) Write(b []byte) (int, error) {
	w("%s", bytes.TrimSuffix(b, []byte("\n")))
	return len(b), nil
}

// logAttrs are the attributes of a container in log records, followed by
// extra key-value pairs.
func (l labelSet) logAttrs(extra ...any) []any {
	return append([]any{"namespace", l.Namespace, "pod", l.Pod, "container", l.Container}, extra...)
}
