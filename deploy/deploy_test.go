package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// decodeStrict turns one YAML document into a typed API object, failing on any
// field the type does not have (a typo in a manifest).
func decodeStrict(doc []byte) (any, error) {
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	var obj any
	switch tm.APIVersion + "/" + tm.Kind {
	case "v1/Namespace":
		obj = &corev1.Namespace{}
	case "v1/ServiceAccount":
		obj = &corev1.ServiceAccount{}
	case "v1/Service":
		obj = &corev1.Service{}
	case "v1/Secret":
		obj = &corev1.Secret{}
	case "apps/v1/DaemonSet":
		obj = &appsv1.DaemonSet{}
	default:
		return nil, fmt.Errorf("unexpected kind %s %s", tm.APIVersion, tm.Kind)
	}
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	return obj, nil
}

func splitDocs(b []byte) [][]byte {
	var out [][]byte
	for _, d := range bytes.Split(b, []byte("\n---\n")) {
		if len(bytes.TrimSpace(d)) > 0 {
			out = append(out, d)
		}
	}
	return out
}

func dir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file)
}

func TestManifestsDecodeStrictly(t *testing.T) {
	var kust struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Namespace  string   `json:"namespace"`
		Resources  []string `json:"resources"`
		Images     []struct {
			Name    string `json:"name"`
			NewName string `json:"newName,omitempty"`
			NewTag  string `json:"newTag,omitempty"`
		} `json:"images"`
	}
	b, err := fs.ReadFile(Manifests, "kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, &kust); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if kust.Kind != "Kustomization" || kust.Namespace != "memprof" {
		t.Errorf("kustomization.yaml: kind %q namespace %q", kust.Kind, kust.Namespace)
	}
	files, _ := fs.Glob(Manifests, "*.yaml")
	for _, f := range files {
		if f == "kustomization.yaml" {
			continue
		}
		if !slices.Contains(kust.Resources, f) {
			t.Errorf("%s is not listed in kustomization.yaml resources", f)
		}
		b, _ := fs.ReadFile(Manifests, f)
		for _, doc := range splitDocs(b) {
			if _, err := decodeStrict(doc); err != nil {
				t.Errorf("%s: %v", f, err)
			}
		}
	}
	for _, r := range kust.Resources {
		if _, err := fs.Stat(Manifests, r); err != nil {
			t.Errorf("kustomization.yaml lists %s, which does not exist", r)
		}
	}
}

func TestKustomizeRender(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Fatalf("kubectl not found: the CI machine image ships /usr/bin/kubectl (with kustomize built in); install kubectl to run this test: %v", err)
	}
	cmd := exec.Command(kubectl, "kustomize", dir())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir(), err, stderr.Bytes())
	}
	var (
		ds   *appsv1.DaemonSet
		svc  *corev1.Service
		sa   *corev1.ServiceAccount
		kind []string
	)
	for _, doc := range splitDocs(out) {
		obj, err := decodeStrict(doc)
		if err != nil {
			t.Fatalf("rendered manifest: %v\n%s", err, doc)
		}
		switch o := obj.(type) {
		case *appsv1.DaemonSet:
			ds = o
			kind = append(kind, "DaemonSet")
		case *corev1.Service:
			svc = o
			kind = append(kind, "Service")
		case *corev1.ServiceAccount:
			sa = o
			kind = append(kind, "ServiceAccount")
		case *corev1.Namespace:
			kind = append(kind, "Namespace")
			if o.Name != "memprof" {
				t.Errorf("namespace %q, want memprof", o.Name)
			}
		}
	}
	if ds == nil || svc == nil || sa == nil {
		t.Fatalf("kubectl kustomize rendered %v; want Namespace, ServiceAccount, Service, DaemonSet", kind)
	}
	for _, ns := range []string{ds.Namespace, svc.Namespace, sa.Namespace} {
		if ns != "memprof" {
			t.Errorf("object in namespace %q, want memprof", ns)
		}
	}
	if ds.Name != "memprof-agent" {
		t.Errorf("DaemonSet name %q", ds.Name)
	}
	pod := ds.Spec.Template.Spec
	if !pod.HostPID {
		t.Error("DaemonSet: hostPID must be true (uprobes and /proc are per host pid)")
	}
	if pod.ServiceAccountName != sa.Name {
		t.Errorf("DaemonSet uses ServiceAccount %q, manifests define %q", pod.ServiceAccountName, sa.Name)
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("DaemonSet selector %s=%s does not match its pod template", k, v)
		}
	}
	for k, v := range svc.Spec.Selector {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("Service selector %s=%s does not match the agent pods", k, v)
		}
	}
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service clusterIP %q, want None (headless: one endpoint per node)", svc.Spec.ClusterIP)
	}
	if len(pod.Tolerations) != 1 || pod.Tolerations[0].Operator != corev1.TolerationOpExists || pod.Tolerations[0].Key != "" || pod.Tolerations[0].Effect != "" {
		t.Errorf("tolerations %+v, want one {operator: Exists} tolerating every taint", pod.Tolerations)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("want 1 container, got %d", len(pod.Containers))
	}
	c := pod.Containers[0]
	if c.Image != "memprof:latest" {
		t.Errorf("image %q, want memprof:latest", c.Image)
	}
	if len(c.Args) == 0 || c.Args[0] != "agent" || !slices.Contains(c.Args, "--listen=$(POD_IP):9464") {
		t.Errorf("args %q: want agent --listen=$(POD_IP):9464 ...", c.Args)
	}
	envs := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			envs[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	if envs["POD_IP"] != "status.podIP" || envs["NODE_NAME"] != "spec.nodeName" {
		t.Errorf("env %v: want POD_IP from status.podIP and NODE_NAME from spec.nodeName", envs)
	}
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil {
		t.Fatalf("securityContext %+v: want privileged false with explicit capabilities", sc)
	}
	var caps []string
	for _, cp := range sc.Capabilities.Add {
		caps = append(caps, string(cp))
	}
	slices.Sort(caps)
	if want := []string{"BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"}; !slices.Equal(caps, want) {
		t.Errorf("capabilities %v, want %v", caps, want)
	}
	if _, ok := c.Resources.Requests[corev1.ResourceMemory]; !ok {
		t.Error("no memory request")
	}
	if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
		t.Error("no memory limit")
	}
	port := ""
	for _, p := range c.Ports {
		if p.Name == "http" {
			port = fmt.Sprint(p.ContainerPort)
		}
	}
	ann := ds.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != port || port != "9464" || ann["prometheus.io/path"] == "" {
		t.Errorf("scrape annotations %v with container port %q: want scrape true on 9464", ann, port)
	}

	// every mount the agent needs, backed by the right host path
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	wantMounts := map[string]struct {
		host string
		ro   bool
	}{
		"/host/proc":          {"/proc", true},
		"/sys/fs/cgroup":      {"/sys/fs/cgroup", true},
		"/sys/kernel/btf":     {"/sys/kernel/btf", true},
		"/sys/kernel/tracing": {"/sys/kernel/tracing", false},
		"/var/log/pods":       {"/var/log/pods", true},
		"/run/containerd":     {"/run/containerd", true},
		"/run/crio":           {"/run/crio", true},
		"/var/lib/memprof":    {"/var/lib/memprof", false},
	}
	seen := map[string]bool{}
	for _, m := range c.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			t.Errorf("mount %s uses undefined volume %s", m.MountPath, m.Name)
			continue
		}
		if m.MountPath == "/etc/memprof/token" {
			if v.Secret == nil || v.Secret.SecretName != "memprof-agent-token" || !slices.Contains(c.Args, "--token-file=/etc/memprof/token/token") {
				t.Errorf("token mount: volume %+v, args %q", v, c.Args)
			}
			seen[m.MountPath] = true
			continue
		}
		w, ok := wantMounts[m.MountPath]
		if !ok {
			continue
		}
		seen[m.MountPath] = true
		if v.HostPath == nil || v.HostPath.Path != w.host || m.ReadOnly != w.ro {
			t.Errorf("mount %s: volume %+v readOnly %v, want hostPath %s readOnly %v", m.MountPath, v.VolumeSource, m.ReadOnly, w.host, w.ro)
		}
	}
	for p := range wantMounts {
		if !seen[p] {
			t.Errorf("DaemonSet does not mount %s", p)
		}
	}
	if !seen["/etc/memprof/token"] {
		t.Error("DaemonSet does not mount the bearer token Secret")
	}
}

// TestDockerfile checks the recipe users build with Docker (no container
// engine here: the tested image is `make image`, see image_test.go): a
// golang:1.26 builder producing a static ./cmd/memprof, and a distroless
// static final stage whose entrypoint is /memprof.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(dir(), "..", "Dockerfile"))
	if err != nil {
		t.Fatalf("read Dockerfile: %v", err)
	}
	var from []string
	text := string(b)
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.EqualFold(f[0], "FROM") {
			from = append(from, f[1])
		}
	}
	if len(from) != 2 || !strings.HasPrefix(from[0], "golang:1.26") || !strings.HasPrefix(from[1], "gcr.io/distroless/static") {
		t.Errorf("stages %v: want golang:1.26 builder then distroless static", from)
	}
	for _, want := range []string{"CGO_ENABLED=0", "go build", "./cmd/memprof", `ENTRYPOINT ["/memprof"]`} {
		if !strings.Contains(text, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	var ent []string
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, "ENTRYPOINT "); ok {
			if err := json.Unmarshal([]byte(rest), &ent); err != nil {
				t.Errorf("ENTRYPOINT %s is not exec form: %v", rest, err)
			}
		}
	}
}
