package targetfs

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// ObjectDeadline is how long the work on one object (parsing its symbols,
// building its CFI or line tables, finding probe sites) may take before
// memprof gives up on that object. Parsing the largest real objects takes a
// few seconds.
var ObjectDeadline = 20 * time.Second

// ErrDeadline is wrapped by the error Guard returns when the work on an
// object outlived its deadline.
var ErrDeadline = errors.New("object took longer than its deadline")

// ErrPanic is wrapped by the error Guard returns when the work on an object
// panicked.
var ErrPanic = errors.New("reading the object panicked")

// Counters of objects abandoned by Guard, for metrics and summaries.
var (
	panics    atomic.Int64
	deadlines atomic.Int64
)

// Failures returns how many objects Guard has abandoned since start: after a
// panic, and after their deadline.
func Failures() (panicked, timedOut int64) { return panics.Load(), deadlines.Load() }

// Guard runs fn, the work on the object called name, so that no panic
// escapes it and it cannot hold the caller longer than timeout (<= 0 means
// ObjectDeadline). fn runs on its own goroutine; on timeout Guard returns at
// once and fn's result is dropped when it ends (fn must only touch state it
// owns or that is safe to update late). The error names the object.
func Guard(name string, timeout time.Duration, fn func() error) error {
	if timeout <= 0 {
		timeout = ObjectDeadline
	}
	done := make(chan error, 1)
	go func() {
		done <- Recover(name, fn)
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		deadlines.Add(1)
		return fmt.Errorf("%s: %w (%v); skipped", name, ErrDeadline, timeout)
	}
}

// Recover runs fn on the calling goroutine and turns a panic into an error
// naming the object.
func Recover(name string, fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			panics.Add(1)
			err = fmt.Errorf("%s: %w: %v; skipped", name, ErrPanic, r)
		}
	}()
	return fn()
}
