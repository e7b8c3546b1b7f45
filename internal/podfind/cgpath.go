package podfind

import (
	"regexp"
	"strings"
)

// QoS classes, spelled as the Kubernetes API spells pod.status.qosClass.
const (
	QoSGuaranteed = "Guaranteed"
	QoSBurstable  = "Burstable"
	QoSBestEffort = "BestEffort"
)

// Runtime names returned by ParseCgroupPath and set in Container.Runtime.
const (
	RuntimeContainerd = "containerd"
	RuntimeCRIO       = "cri-o"
	RuntimeDocker     = "docker"
)

var (
	// systemd driver pod slice: kubepods-pod<uid>.slice (guaranteed) or
	// kubepods-<qos>-pod<uid>.slice; a kubelet --cgroup-root adds a prefix
	// (kubelet-kubepods-...), as kind nodes do.
	podSliceRe = regexp.MustCompile(`^(?:[a-z0-9_.]+-)?kubepods(?:-(burstable|besteffort))?-pod([0-9a-f_]{32,36})\.slice$`)
	// cgroupfs driver pod directory. Static (mirror) pods have a 32-hex uid
	// without dashes, API pods a 36-character UUID.
	podDirRe = regexp.MustCompile(`^pod([0-9a-f-]{32,36})$`)
	// container cgroups: systemd scopes and cgroupfs directories. CRI-O's
	// conmon scope (crio-conmon-<id>) is deliberately not matched: it holds
	// the monitor, not the container.
	scopeRe = regexp.MustCompile(`^(cri-containerd|crio|docker)-([0-9a-f]{64})\.scope$`)
	dirRe   = regexp.MustCompile(`^(?:(crio|docker)-)?([0-9a-f]{64})$`)
)

func runtimeOf(prefix string) string {
	switch prefix {
	case "cri-containerd":
		return RuntimeContainerd
	case "crio":
		return RuntimeCRIO
	case "docker":
		return RuntimeDocker
	}
	return ""
}

func qosOf(s string) string {
	switch s {
	case "burstable":
		return QoSBurstable
	case "besteffort":
		return QoSBestEffort
	}
	return QoSGuaranteed
}

// ParseCgroupPath recognises the cgroup of a Kubernetes container as the
// kubelet lays it out under either cgroup driver:
//
//	cgroupfs: /kubepods[/burstable|/besteffort]/pod<uid>/<64hex>
//	          (CRI-O with cgroupfs names the leaf crio-<64hex>)
//	systemd:  /kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_with_underscores>.slice/
//	          {cri-containerd,crio,docker}-<64hex>.scope
//
// Guaranteed pods sit directly under kubepods. p may be a path inside the
// cgroup hierarchy (as /proc/PID/cgroup prints it) or a filesystem path such as
// /sys/fs/cgroup/memory/kubepods/...; components below the container (a
// runtime's nested sub-cgroup) are accepted and ignored.
//
// ok is true when p is at or below a container cgroup. For a pod-level cgroup
// (the pod directory itself) podUID and qos are still returned, with ok false.
// runtime is "containerd", "cri-o" or "docker" when the leaf names it, and ""
// for a bare 64-hex cgroupfs leaf (containerd and cri-dockerd both use those).
// The uid is returned with dashes (systemd slices spell them as underscores).
func ParseCgroupPath(p string) (podUID, containerID, runtime, qos string, ok bool) {
	_, podUID, containerID, runtime, qos, ok = parseCgroupPath(p)
	return
}

// parseCgroupPath also returns how many leading components of p make up the
// container cgroup (so the caller can cut a nested sub-cgroup off).
func parseCgroupPath(p string) (depth int, podUID, containerID, runtime, qos string, ok bool) {
	comps := strings.Split(strings.Trim(p, "/"), "/")
	for i, c := range comps {
		// systemd driver
		if m := podSliceRe.FindStringSubmatch(c); m != nil && i > 0 && strings.HasSuffix(comps[i-1], ".slice") {
			podUID = strings.ReplaceAll(m[2], "_", "-")
			qos = qosOf(m[1])
			if i+1 < len(comps) {
				if s := scopeRe.FindStringSubmatch(comps[i+1]); s != nil {
					return i + 2, podUID, s[2], runtimeOf(s[1]), qos, true
				}
			}
			return 0, podUID, "", "", qos, false
		}
		// cgroupfs driver
		if m := podDirRe.FindStringSubmatch(c); m != nil && i > 0 {
			parent := comps[i-1]
			switch {
			case parent == "kubepods":
				qos = QoSGuaranteed
			case (parent == "burstable" || parent == "besteffort") && i > 1 && comps[i-2] == "kubepods":
				qos = qosOf(parent)
			default:
				continue
			}
			podUID = m[1]
			if i+1 < len(comps) {
				if s := dirRe.FindStringSubmatch(comps[i+1]); s != nil {
					return i + 2, podUID, s[2], runtimeOf(s[1]), qos, true
				}
			}
			return 0, podUID, "", "", qos, false
		}
	}
	return 0, "", "", "", "", false
}
