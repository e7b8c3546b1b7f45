// rss_goleak: a Go program that makes a known amount of memory resident
// from one known function, for the RSS tier's tests.
//
//	rss_goleak MIB      wait for a line on stdin, leak MIB MiB in 64 KiB
//	                    slices from main.leakSlices (touching every page),
//	                    print "ready"; then for each line "more N" leak N
//	                    MiB more from main.leakMore and print "ready" (for
//	                    "again N": from main.leakAgain); exit at any other
//	                    line or EOF
//	rss_goleak -oom     leak 1 MiB slices from main.leakSlices forever
//	                    (until the kernel kills the process)
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"time"
)

var kept [][]byte

//go:noinline
func leakSlices(mib int) {
	for i := 0; i < mib*16; i++ {
		b := make([]byte, 64<<10)
		for j := 0; j < len(b); j += 4096 {
			b[j] = 1
		}
		kept = append(kept, b)
	}
}

func main() {
	in := bufio.NewReader(os.Stdin)
	if len(os.Args) > 1 && os.Args[1] == "-oom" {
		in.ReadString('\n')
		for {
			leakSlices(1)
			time.Sleep(time.Millisecond)
		}
	}
	mib, _ := strconv.Atoi(os.Args[1])
	in.ReadString('\n')
	leakSlices(mib)
	fmt.Println("ready")
	for {
		l, _ := in.ReadString('\n')
		var n int
		if _, err := fmt.Sscanf(l, "more %d", &n); err == nil {
			leakMore(n)
		} else if _, err := fmt.Sscanf(l, "again %d", &n); err == nil {
			leakAgain(n)
		} else {
			return
		}
		fmt.Println("ready")
	}
}

//go:noinline
func leakMore(mib int) { leakSlices(mib) }

//go:noinline
func leakAgain(mib int) { leakSlices(mib) }
