// The Go anchor: a splice of the shape of upstream's current runner, io.Copy each way
// and CloseWrite on EOF.  Usage: splice LISTEN_PORT TARGET_PORT
package main

import (
	"io"
	"net"
	"os"
)

func pipe(dst, src *net.TCPConn, done chan<- struct{}) {
	io.Copy(dst, src)
	dst.CloseWrite()
	done <- struct{}{}
}

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		panic(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go func(client *net.TCPConn) {
			up, err := net.Dial("tcp", "127.0.0.1:"+os.Args[2])
			if err != nil {
				client.Close()
				return
			}
			upstream := up.(*net.TCPConn)
			done := make(chan struct{}, 2)
			go pipe(upstream, client, done)
			go pipe(client, upstream, done)
			<-done
			<-done
			client.Close()
			upstream.Close()
		}(c.(*net.TCPConn))
	}
}
