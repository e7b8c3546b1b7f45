// RssGrow: a Java program growing a known structure, for the RSS tier's
// tests: after a line on stdin it keeps 64 arrays of 1 MiB (filled by
// RssGrow.grow), prints "ready" and waits for another line.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.ArrayList;

public class RssGrow {
    static ArrayList<byte[]> kept = new ArrayList<>();

    static void grow() {
        for (int i = 0; i < 64; i++) {
            byte[] b = new byte[1 << 20];
            for (int j = 0; j < b.length; j += 4096) {
                b[j] = 1;
            }
            kept.add(b);
        }
    }

    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        in.readLine();
        grow();
        System.out.println("ready");
        System.out.flush();
        in.readLine();
    }
}
