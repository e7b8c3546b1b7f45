package main

import (
	"fmt"

	"github.com/urfave/cli/v2"
)

func agentCommand() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run as the node agent (Kubernetes DaemonSet)",
		Action: func(c *cli.Context) error {
			return fmt.Errorf("the agent is not built yet")
		},
	}
}
