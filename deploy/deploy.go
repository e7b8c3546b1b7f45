// Package deploy holds memprof's Kubernetes manifests (a kustomization of the
// memprof namespace, the agent's ServiceAccount, headless Service and
// DaemonSet) and embeds them, so the binary can print them.
package deploy

import "embed"

// Manifests are the YAML files of this directory, kustomization.yaml included.
//
//go:embed *.yaml
var Manifests embed.FS
