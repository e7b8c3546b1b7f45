package podfind

import (
	"fmt"
	"sort"
	"strings"
)

// Select picks the containers of one pod for `memprof record --pod`. pod is a
// pod name or a pod UID; namespace may be "" when the name is unique on the
// node; container "" selects every container of the pod. The errors list what
// is on the node, so the user can correct the command.
func Select(all []Container, pod, namespace, container string) ([]Container, error) {
	if pod == "" {
		return nil, fmt.Errorf("no pod given: pass --pod NAME (pods on this node: %s)", listPods(all))
	}
	var named []Container
	for _, c := range all {
		if c.Pod == pod || c.PodUID == pod {
			named = append(named, c)
		}
	}
	if len(named) == 0 {
		return nil, fmt.Errorf("pod %q is not running on this node; pods seen here: %s (pods are only visible on the node that runs them: check `kubectl get pod -A -o wide`)", pod, listPods(all))
	}
	namespaces := uniq(named, func(c Container) string { return c.Namespace })
	var inNS []Container
	if namespace != "" {
		for _, c := range named {
			if c.Namespace == namespace {
				inNS = append(inNS, c)
			}
		}
		if len(inNS) == 0 {
			return nil, fmt.Errorf("pod %q is not in namespace %q on this node; it is in namespace(s): %s (pass --namespace with one of them)", pod, namespace, quoteList(namespaces))
		}
	} else {
		if len(namespaces) > 1 {
			return nil, fmt.Errorf("pod name %q is ambiguous on this node: it exists in namespaces %s; pass --namespace", pod, quoteList(namespaces))
		}
		inNS = named
	}
	if container == "" {
		return inNS, nil
	}
	var out []Container
	for _, c := range inNS {
		if c.Name == container {
			out = append(out, c)
		}
	}
	if len(out) == 0 {
		names := uniq(inNS, func(c Container) string {
			if c.Name == "" {
				return "(unnamed " + short(c.ID) + ")"
			}
			return c.Name
		})
		return nil, fmt.Errorf("pod %s/%s has no running container %q; its containers: %s (pass --container with one of them, or omit it to profile all)",
			inNS[0].Namespace, pod, container, quoteList(names))
	}
	return out, nil
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func uniq(cs []Container, key func(Container) string) []string {
	seen := map[string]bool{}
	var out []string
	for _, c := range cs {
		k := key(c)
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

func quoteList(s []string) string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = fmt.Sprintf("%q", v)
	}
	return strings.Join(q, ", ")
}

func listPods(all []Container) string {
	pods := uniq(all, func(c Container) string {
		if c.Pod == "" {
			return "pod uid " + c.PodUID + " (name unknown)"
		}
		return c.Namespace + "/" + c.Pod
	})
	if len(pods) == 0 {
		return "none (no kubelet container cgroups found)"
	}
	return strings.Join(pods, ", ")
}
