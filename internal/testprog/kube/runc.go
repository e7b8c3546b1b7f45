package kube

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// RuncSpec describes a container RunContainer starts.
type RuncSpec struct {
	FSRoot   string   // test-unique cgroup root (see RemoveCgroupTree)
	Pod      Pod      // the container's pod
	QoS      string   // the pod's QoS class directory; default "burstable"
	Name     string   // container name (termination-log path, pod log entry)
	Rootfs   string   // root filesystem (see Rootfs), mounted read-only
	Args     []string // the command, a path inside Rootfs first
	MemLimit int64    // memory limit in bytes (0: none)
	// Logs, when set, is the pod log root where the container's 0.log is
	// created (<Logs>/<ns>_<pod>_<uid>/<Name>/0.log).
	Logs string
}

// Container is a container started with runc.
type Container struct {
	ID         string // 64 hex digits
	CgroupPath string // runc's cgroupsPath: <pod cgroup parent>/<ID>
	Pid        int    // host pid of the container's init process
	stdout     string
	runc       func(args ...string) *exec.Cmd
}

// RunContainer starts a runc container detached, in the kubelet-style
// cgroup <CgroupParent>/<id> (cgroupfs driver) with the kubelet's
// termination-log bind mount (/dev/termination-log from
// <tmp>/kubelet/pods/<uid>/containers/<name>/<random>), its state in a
// temporary directory. It is deleted when the test ends.
func RunContainer(t testing.TB, s RuncSpec) *Container {
	t.Helper()
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Fatalf("runc not found: install the Debian package runc (apt-get install runc): %v", err)
	}
	if s.QoS == "" {
		s.QoS = "burstable"
	}
	tmp := t.TempDir()
	bundle := filepath.Join(tmp, "bundle")
	if err := os.MkdirAll(bundle, 0o755); err != nil {
		t.Fatal(err)
	}
	id := NewID()
	c := &Container{ID: id, CgroupPath: s.Pod.CgroupParent(s.FSRoot, s.QoS) + "/" + id}
	termLog := filepath.Join(tmp, "kubelet", "pods", s.Pod.UID, "containers", s.Name, RandHex(8))
	WriteFile(t, termLog, "")
	if s.Logs != "" {
		s.Pod.WriteLog(t, s.Logs, s.Name)
	}
	if out, err := exec.Command(runc, "spec", "-b", bundle).CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v\n%s", err, out)
	}
	cfgPath := filepath.Join(bundle, "config.json")
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatalf("parse runc spec: %v", err)
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = s.Args
	spec["root"] = map[string]any{"path": s.Rootfs, "readonly": true}
	spec["mounts"] = append(spec["mounts"].([]any), map[string]any{
		"destination": "/dev/termination-log", "type": "bind", "source": termLog,
		"options": []string{"rbind", "rw"},
	})
	lin := spec["linux"].(map[string]any)
	lin["cgroupsPath"] = c.CgroupPath
	if s.MemLimit > 0 {
		res, _ := lin["resources"].(map[string]any)
		if res == nil {
			res = map[string]any{}
		}
		res["memory"] = map[string]any{"limit": s.MemLimit}
		lin["resources"] = res
	}
	raw, _ = json.MarshalIndent(spec, "", "  ")
	if err := os.WriteFile(cfgPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(tmp, "runc-state")
	c.runc = func(args ...string) *exec.Cmd {
		return exec.Command(runc, append([]string{"--root", state}, args...)...)
	}
	t.Cleanup(func() {
		if c.runc("state", id).Run() != nil {
			return // already deleted
		}
		if out, err := c.runc("delete", "-f", id).CombinedOutput(); err != nil {
			t.Errorf("runc delete -f %s: %v\n%s", id, err, out)
		}
	})
	c.stdout = filepath.Join(tmp, "stdout")
	f, err := os.Create(c.stdout)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	run := c.runc("run", "-d", "-b", bundle, id)
	run.Stdout, run.Stderr = f, f
	if err := run.Run(); err != nil {
		b, _ := os.ReadFile(c.stdout)
		t.Fatalf("runc run -d: %v\n%s", err, b)
	}
	out, err := c.runc("state", id).Output()
	if err != nil {
		t.Fatalf("runc state %s: %v", id, err)
	}
	var st struct{ Pid int }
	if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 0 {
		t.Fatalf("runc state %s: %v: %s", id, err, out)
	}
	c.Pid = st.Pid
	return c
}

// Output is what the container wrote to stdout and stderr so far.
func (c *Container) Output() string {
	b, _ := os.ReadFile(c.stdout)
	return string(b)
}

// Delete kills and deletes the container now (runc delete -f).
func (c *Container) Delete(t testing.TB) {
	t.Helper()
	if out, err := c.runc("delete", "-f", c.ID).CombinedOutput(); err != nil {
		t.Errorf("runc delete -f %s: %v\n%s", c.ID, err, out)
	}
}
