package pprofout

import "github.com/google/pprof/profile"

// StackFrames renders a profile's stack leaf first the way Top does: one
// string per line ("func file:line", "func file", "func") with inlined
// frames innermost first, "0xaddr" for unsymbolized locations. Two stacks
// with equal StackFrames are one row of Top.
func StackFrames(locs []*profile.Location) []string { return stackFrames(locs) }

// Frames renders a stack of Locations (before Build) exactly as StackFrames
// renders the same stack once built, so series recorded by stack can be
// matched with the profile's rows.
func Frames(stack []*Location) []string {
	locs := make([]*profile.Location, 0, len(stack))
	for _, loc := range stack {
		if loc == nil {
			continue
		}
		pl := &profile.Location{Address: loc.Addr}
		for _, ln := range loc.Lines {
			sys := ln.SystemName
			if sys == "" {
				sys = ln.Function
			}
			pl.Line = append(pl.Line, profile.Line{Function: &profile.Function{Name: ln.Function, SystemName: sys, Filename: ln.File}, Line: ln.Line})
		}
		locs = append(locs, pl)
	}
	return stackFrames(locs)
}
