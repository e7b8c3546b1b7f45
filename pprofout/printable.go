package pprofout

import (
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// Printable returns s with what a terminal would act on escaped: C0 control
// characters (newline and tab included), DEL, C1 control characters
// (U+0080-U+009F) and bytes that are not UTF-8 become \xNN (\u00NN for C1),
// so a name a target or a profile chose (a function, comm, cgroup path)
// cannot move the cursor, retitle the window or hide lines when printed.
func Printable(s string) string { return escapeControls(s, false) }

func escapeControls(s string, keepLines bool) string {
	clean := true
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if isControl(r, n, keepLines) {
			clean = false
			break
		}
		i += n
	}
	if clean {
		return s
	}
	var sb strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			fmt.Fprintf(&sb, `\x%02x`, s[i])
		case isControl(r, n, keepLines) && r < 0x80:
			fmt.Fprintf(&sb, `\x%02x`, r)
		case isControl(r, n, keepLines):
			fmt.Fprintf(&sb, `\u%04x`, r)
		default:
			sb.WriteString(s[i : i+n])
		}
		i += n
	}
	return sb.String()
}

func isControl(r rune, n int, keepLines bool) bool {
	switch {
	case r == utf8.RuneError && n <= 1:
		return true
	case keepLines && (r == '\n' || r == '\t'):
		return false
	}
	return r < 0x20 || r == 0x7f || (r >= 0x80 && r <= 0x9f)
}

// PrintableWriter writes to w what it is given with the characters
// Printable escapes escaped, newlines and tabs kept: for text reports whose
// every line may hold names read from a profile. Each Write is escaped on
// its own (a UTF-8 sequence split across two writes is escaped as bytes).
// It reports the bytes given as written.
func PrintableWriter(w io.Writer) io.Writer { return printableWriter{w} }

type printableWriter struct{ w io.Writer }

func (p printableWriter) Write(b []byte) (int, error) {
	if _, err := io.WriteString(p.w, escapeControls(string(b), true)); err != nil {
		return 0, err
	}
	return len(b), nil
}
