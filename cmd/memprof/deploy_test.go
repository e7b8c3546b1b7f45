package main

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"

	"github.com/memprof/memprof/deploy"
)

// TestDaemonSetArgs: every flag the DaemonSet passes is one the agent
// accepts (the manifest and the command are changed separately).
func TestDaemonSetArgs(t *testing.T) {
	raw, err := deploy.Manifests.ReadFile("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(raw, &ds); err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, f := range agentCommand().Flags {
		for _, n := range f.Names() {
			known[n] = true
		}
	}
	checked := 0
	for _, c := range ds.Spec.Template.Spec.Containers {
		if len(c.Args) == 0 || c.Args[0] != "agent" {
			t.Fatalf("container %s args %v: want the agent subcommand first", c.Name, c.Args)
		}
		for _, a := range c.Args[1:] {
			name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
			if !known[name] {
				t.Errorf("the DaemonSet passes %q, which memprof agent does not accept", a)
			}
			checked++
		}
	}
	if checked == 0 {
		t.Fatal("no agent flags found in the DaemonSet")
	}
}
